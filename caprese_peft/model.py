"""The Caprese tuner: finds the gated MLP blocks of a model and wraps them with ``CapreseLayer``."""

from __future__ import annotations

from contextlib import contextmanager

from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from tqdm.auto import tqdm

from .config import CapreseConfig
from .layer import CapreseLayer, gated_mlp_problem, named_caprese_layers
from .registration import PREFIX
from .state import GenerationState

# Every supported decoder names its MLP block `mlp`; a suffix match finds it in any of them.
DEFAULT_TARGET_MODULES = ["mlp"]
# Multimodal Gemma 3 also has `mlp` blocks in its vision tower, which are not gated: wrap only the text model.
TARGET_MODULE_MAPPING: dict[str, object] = {
    "llama": ["mlp"],
    "mistral": ["mlp"],
    "qwen2": ["mlp"],
    "qwen3": ["mlp"],
    "gemma": ["mlp"],
    "gemma2": ["mlp"],
    "gemma3_text": ["mlp"],
    "gemma3": r".*language_model.*\.mlp",
}


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class CapreseModel(BaseTuner):
    """PEFT tuner for Caprese. Build it through ``peft.get_peft_model(model, CapreseConfig(...))``.

    Holds the ``GenerationState`` its layers share and the hooks that keep it current.
    """

    prefix: str = PREFIX
    tuner_layer_cls = CapreseLayer
    target_module_mapping = TARGET_MODULE_MAPPING
    uses_shared_state = True

    def __init__(self, model: nn.Module, config, adapter_name: str = "default", **kwargs) -> None:
        state = GenerationState(reselect_every=self._reselect_every, trains_factors=self._trains_factors)
        object.__setattr__(self, "caprese_state", state)
        super().__init__(model, config, adapter_name, **kwargs)
        object.__setattr__(self, "_caprese_hooks", self.caprese_state.attach(self.model))

    def _running(self) -> tuple[str, CapreseLayer] | None:
        """The Caprese adapter generating now and one layer of it; None when no Caprese adapter runs."""
        adapters = self.active_adapters
        if len(adapters) != 1 or adapters[0] not in self.peft_config:
            return None
        adapter = adapters[0]
        # asked at every forward: find a layer of the adapter once, not by walking the model each time
        layers = self.__dict__.setdefault("_layer_of_adapter", {})
        if adapter not in layers:
            layers[adapter] = next((m for m in self.model.modules() if adapter in getattr(m, "caprese_L", {})), None)
        layer = layers[adapter]
        if layer is None or layer.active_adapter_name() != adapter:  # disabled, or covering no layer
            return None
        return adapter, layer

    def _reselect_every(self) -> int | None:
        """The reselection interval of the adapter generating now; None when no Caprese adapter runs."""
        running = self._running()
        return None if running is None else self.peft_config[running[0]].reselect_every

    def _trains_factors(self) -> bool:
        """Whether the ``L``, ``R`` of the adapter running now require gradients."""
        running = self._running()
        return running is not None and running[1].caprese_L[running[0]].requires_grad

    def _forget_layers(self) -> None:
        self.__dict__.pop("_layer_of_adapter", None)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        # PeftModel drops `adapter_names` before calling the model: refuse it rather than run the active adapter
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "Caprese runs one adapter for a whole batch: adapter_names (a different adapter per row) is not "
                "supported. Split the batch by adapter and call set_adapter(name) before each part."
            )
        yield

    def generate(self, *args, **kwargs):
        """``generate`` of the wrapped model, which ``PeftModel.generate`` calls.

        Marks the call for the generation state, so that ``use_cache=False`` (every step recomputes the whole
        sequence) still runs generated tokens sparse; refuses beam search with reselection, whose per-sequence
        statistics would have to follow the beams.
        """
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
        if beams > 1 and self._reselect_every() is not None:
            raise NotImplementedError(
                "Beam search reorders sequences between steps, which reselection's per-sequence statistics do not "
                "follow; use greedy decoding or sampling with reselect_every, or an adapter without it."
            )
        with self.caprese_state.generating():
            return self.model.generate(*args, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        was_active = adapter_name in self.active_adapters
        super().delete_adapter(adapter_name)
        self._forget_layers()
        if was_active and self.peft_config:
            # PEFT takes the next active adapter from the first wrapped block, which need not hold any other adapter
            # (adapters may wrap different layers): choose it from the remaining adapters, as PEFT's layers do
            self.set_adapter(sorted(self.peft_config)[0])

    def _prepare_adapter_config(self, peft_config: CapreseConfig, model_config: dict) -> CapreseConfig:
        if peft_config.target_modules is None:
            target = TARGET_MODULE_MAPPING.get(model_config.get("model_type"), DEFAULT_TARGET_MODULES)
            peft_config.target_modules = set(target) if isinstance(target, list) else target
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        self._check_config(model, self.peft_config[adapter_name])
        self._forget_layers()
        super().inject_adapter(model, adapter_name, **kwargs)

    def _check_config(self, model: nn.Module, config: CapreseConfig) -> None:
        """Check the config against the model before anything is wrapped; fill in the model's sizes."""
        text_config = _text_config(model)
        n_layers = getattr(text_config, "num_hidden_layers", None)
        if config.layers_to_transform is not None and n_layers is not None:
            bad = [i for i in config.layers_to_transform if i >= n_layers]
            if bad:
                raise ValueError(
                    f"layers_to_transform has indices {bad}, but the model has {n_layers} layers "
                    f"(valid: 0 to {n_layers - 1})."
                )

        config = self._prepare_adapter_config(config, self.get_model_config(model))
        # a block already wrapped for another adapter is checked as the block it wraps
        targets = [
            (name, m.get_base_layer() if isinstance(m, CapreseLayer) else m)
            for name, m in model.named_modules()
            if self._check_target_module_exists(config, name)
        ]
        if not targets:
            raise ValueError(
                f"No module of {type(model).__name__} matches target_modules={config.target_modules!r} "
                f"(layers_to_transform={config.layers_to_transform}). Caprese wraps gated MLP blocks with "
                f"gate_proj, up_proj, down_proj and act_fn, such as those of Llama, Mistral, Qwen2/3 and Gemma 2/3."
            )
        for name, module in targets:
            problem = gated_mlp_problem(module)
            if problem:
                raise ValueError(
                    f"Caprese cannot wrap {name!r} ({type(module).__name__}): {problem}. Caprese wraps gated MLP "
                    "blocks with gate_proj, up_proj, down_proj (nn.Linear) and act_fn, as in Llama, Mistral, "
                    "Qwen2/3 and Gemma 2/3; point target_modules at such blocks."
                )

        mlp_name, mlp = targets[0]
        hidden, intermediate = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        for field_name, expected, found in (
            ("hidden_size", config.hidden_size, hidden),
            ("intermediate_size", config.intermediate_size, intermediate),
        ):
            if expected is not None and expected != found:
                raise ValueError(
                    f"This adapter was made for a base model with {field_name}={expected}, but {mlp_name!r} of this "
                    f"model has {field_name}={found}. Load it onto the base model it was trained for."
                )
        if config.r > hidden:
            raise ValueError(f"r={config.r} exceeds the model's hidden size {hidden}; choose 1 <= r <= {hidden}.")
        config.hidden_size, config.intermediate_size = hidden, intermediate

    def _create_and_replace(
        self,
        peft_config: CapreseConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        options = {
            "r": peft_config.r,
            "backbone": peft_config.backbone,
            "density": peft_config.density,
            "init_weights": peft_config.init_weights,
            "stand_in_bits": peft_config.stand_in_bits,
        }
        if isinstance(target, CapreseLayer):
            target.update_layer(adapter_name, **options)
            return
        new_module = CapreseLayer(target, adapter_name, state=self.caprese_state, **options)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # L and R follow the dtype of the base weights they are added to; PEFT would upcast them to fp32.
        pass

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ):
        if merge:
            raise NotImplementedError(
                "merge_and_unload is not available for Caprese: prompt tokens run the dense block and generated "
                "tokens the sparse block plus x @ L @ R, so no plain model reproduces it. Keep the PEFT model, or "
                "call unload() to recover the untouched base model."
            )
        for handle in self._caprese_hooks:
            handle.remove()
        object.__setattr__(self, "_caprese_hooks", [])
        # PEFT's generic unloading assumes the wrapped module has a `weight`; an MLP block has none
        layers = list(named_caprese_layers(self.model).items())
        for name, layer in tqdm(layers, disable=not progressbar, desc="Unloading Caprese layers"):
            parent_name, _, child_name = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child_name, layer.get_base_layer())
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model
