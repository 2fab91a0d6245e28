"""End-to-end greedy decoding: TTFT, TTNT and total time of dense, GRIFFIN, CATS and Caprese in one harness.

Real architectures (Llama-3.1-8B, Qwen2.5-14B) built from their configs, written below, with random bf16
weights (no downloads); batch 1, a 2048-token prompt, 256 and 2048 generated tokens, decoded with
``caprese_peft.FastDecoder`` (dense transformers prefill, then the lean decode step captured in CUDA graphs by
``torch.compile(mode="reduce-overhead")``). Variants:

- ``hf-dense``: the base model through transformers' own ``generate`` with a static cache, which it compiles
  (the baseline at its best without this project);
- ``dense``: the base model;
- ``griffin``: GRIFFIN at density 0.5 on the first half of the layers, without the correction;
- ``caprese-griffin``: the same plus ``x @ L @ R`` (r = 256, random factors);
- ``cats``: CATS at density 0.5 on every layer (the Triton kernel), without the correction;
- ``caprese-cats``: the same plus ``x @ L @ R``.

Each variant is warmed up (compilation, graph capture, kernel autotuning), then timed once over the prompt and
max(--generate) new tokens with CUDA events and no host sync inside the loop: TTFT is prompt to first token
(prefill, KV copy and GRIFFIN's weight materialisation included); TTNT for G tokens is the mean of the first
G - 1 decode steps; total = TTFT + (G - 1) TTNT. The static KV cache is sized for the longest setting, so the
shorter one reads it whole too (masked). The byte floor of a step is the bytes it must read (weights, then
weights plus the KV cache) over the measured copy bandwidth; CATS counts its nominal density. Writes JSON and
markdown to ``benchmarks/results/e2e/``.

    python benchmarks/bench_e2e.py --models llama-3.1-8b [--variants dense griffin ...] [--generate 256 2048]
    python benchmarks/bench_e2e.py --summarize    # one markdown table from every JSON in the results folder
    python benchmarks/bench_e2e.py --smoke        # a tiny config on a CPU: proves the script runs
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, copy_bandwidth_gbps, run_metadata, slug  # noqa: E402
from caprese_peft.fast_decode import COMPILE_MODES  # noqa: E402

OUTPUT_DIR = RESULTS / "e2e"
CONFIGS = {  # model_type, config fields (from the models' published config.json)
    "llama-3.1-8b": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            tie_word_embeddings=False,
            bos_token_id=128000,
            eos_token_id=128001,
        ),
    ),
    "qwen2.5-14b": (
        "qwen2",
        dict(
            vocab_size=152064,
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=48,
            num_attention_heads=40,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            use_sliding_window=False,
            tie_word_embeddings=False,
            bos_token_id=151643,
            eos_token_id=151643,
        ),
    ),
}
SMOKE_CONFIG = (
    "llama",
    dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
)
ADAPTERS = {  # backbone, density, layers ("first-half" or "all")
    "griffin": ("griffin", 0.5, "first-half"),
    "cats": ("cats", 0.5, "all"),
}
VARIANTS = {  # name: (adapter or None, FastDecoder mode, or "generate" for transformers' generate)
    "hf-dense": (None, "generate"),
    "dense": (None, "dense"),
    "griffin": ("griffin", "backbone"),
    "caprese-griffin": ("griffin", "caprese"),
    "cats": ("cats", "backbone"),
    "caprese-cats": ("cats", "caprese"),
}
# the targets on one H100 (Llama-3.1-8B, bf16, batch 1)
TARGET_FLOOR_RATIO = 1.3
TARGET_SPEEDUP = {"caprese-cats": 1.25, "caprese-griffin": 1.18}
TARGET_VS_BACKBONE = 1.03
TARGET_SAVING_FRACTION = 0.9


def build_model(name: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A causal LM of architecture ``name`` with random weights, built on ``device`` without downloads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, fields = SMOKE_CONFIG if name == "smoke" else CONFIGS[name]
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


class Clock:
    """Timestamps in ms: CUDA events read after one sync at the end, or wall clock on a CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.marks: dict[str, object] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event
        else:
            self.marks[name] = time.perf_counter()

    def elapsed(self, start: str, end: str) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return self.marks[start].elapsed_time(self.marks[end])
        return (self.marks[end] - self.marks[start]) * 1e3


def measure_generate(model, prompt: torch.Tensor, settings: list[int], args, device: str) -> dict:
    """transformers' ``generate`` with a static cache (compiled by generate itself on a GPU): TTFT from a one-token
    run, TTNT from the difference to each setting's run, medians of three after two warm-ups."""
    torch._dynamo.reset()
    kwargs = dict(do_sample=False, cache_implementation="static", pad_token_id=0)

    def run(tokens: int) -> float:
        clock = Clock(device)
        clock.mark("start")
        model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
        clock.mark("end")
        return clock.elapsed("start", "end")

    warm_start = time.perf_counter()
    for _ in range(2):
        run(args.warmup_tokens)  # compiles the decode step and records its graphs
    warmup_s = time.perf_counter() - warm_start
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ttft = sorted(run(1) for _ in range(3))[1]
    result = {"mode": "generate", "warmup_s": round(warmup_s, 1), "ttft_ms": round(ttft, 2), "settings": {}}
    for setting in settings:
        total = sorted(run(setting) for _ in range(3))[1]
        result["settings"][str(setting)] = {
            "ttnt_ms": round((total - ttft) / max(setting - 1, 1), 4),
            "total_ms": round(total, 2),
        }
    if device == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def measure(model, mode: str, prompt: torch.Tensor, settings: list[int], args, device: str) -> dict:
    """Warm up, then time one greedy run of ``max(settings)`` tokens; TTFT, TTNT and totals per setting."""
    from caprese_peft import FastDecoder

    if mode == "generate":
        return measure_generate(model, prompt, settings, args, device)
    torch._dynamo.reset()  # each variant compiles its own step; stale graphs only count against the cache limit
    longest = max(settings)
    decoder = FastDecoder(
        model,
        mode=mode,
        max_seq_len=prompt.shape[1] + longest,
        compile=args.compile,
        compile_layers_once=not args.unrolled,
    )
    warm_start = time.perf_counter()
    for _ in range(2):  # compile and record the graph, then replay it once
        decoder.generate(prompt, max_new_tokens=args.warmup_tokens, ignore_eos=True)
    warmup_s = time.perf_counter() - warm_start
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    clock = Clock(device)
    clock.mark("start")
    tokens = decoder.prefill(prompt).argmax(dim=-1)
    clock.mark("first")
    for generated in range(2, longest + 1):
        tokens = decoder.decode_greedy(tokens)
        if generated in settings:
            clock.mark(f"after-{generated}")
    ttft = clock.elapsed("start", "first")
    result = {
        "mode": mode,
        "warmup_s": round(warmup_s, 1),
        "ttft_ms": round(ttft, 2),
        "weight_bytes": decoder.lean.weight_bytes(),
        "cache_bytes": decoder.lean.cache_bytes(),
        "extra_bytes": decoder.lean.extra_bytes(model),  # held beyond the model's weights and the KV cache
        "settings": {},
    }
    for setting in settings:
        decode_ms = clock.elapsed("first", f"after-{setting}") if setting > 1 else 0.0
        ttnt = decode_ms / max(setting - 1, 1)
        result["settings"][str(setting)] = {
            "ttnt_ms": round(ttnt, 4),
            "total_ms": round(ttft + decode_ms, 2),
        }
    if device == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del decoder
    return result


def wrap(model, adapter: str, rank: int):
    """The PEFT model of one of ``ADAPTERS`` with random (nonzero) factors."""
    from peft import get_peft_model

    from caprese_peft import CapreseConfig

    backbone, density, layers = ADAPTERS[adapter]
    n_layers = model.config.num_hidden_layers
    chosen = list(range(n_layers // 2)) if layers == "first-half" else None
    config = CapreseConfig(backbone=backbone, density=density, r=rank, layers_to_transform=chosen, init_weights=False)
    return get_peft_model(model, config)


def run_model(name: str, args, device: str, meta: dict, copy_gbps: float, output: Path) -> dict:
    """Time every requested variant of model ``name``; the JSON at ``output`` is rewritten after each one."""
    from caprese_peft import release_decode_caches

    dtype = torch.bfloat16
    model = build_model(name, device, dtype)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), generator=gen).to(device)
    report = {
        **meta,
        "model": name,
        "batch": args.batch,
        "prompt": args.prompt,
        "rank": args.rank,
        "compile": args.compile,
        "copy_gb_per_s": round(copy_gbps, 1),
        "variants": {},
    }
    print(f"\n{name}: batch {args.batch}, prompt {args.prompt}, generate {args.generate}, compile {args.compile}")
    for adapter in [None, *ADAPTERS]:
        # transformers' generate compiles the whole model for itself: run it after our own variants
        names = sorted((v for v in args.variants if VARIANTS[v][0] == adapter), key=lambda v: v == "hf-dense")
        if not names:
            continue
        target = model if adapter is None else wrap(model, adapter, args.rank)
        for variant in names:
            try:
                result = measure(target, VARIANTS[variant][1], prompt, args.generate, args, device)
            except Exception as error:  # one failing variant must not cost the others their turn
                print(f"  {variant:<16} FAILED: {type(error).__name__}: {error}", file=sys.stderr)
                report["variants"][variant] = {"error": f"{type(error).__name__}: {error}"[:2000]}
                output.write_text(json.dumps(report, indent=2))
                continue
            if "weight_bytes" not in result:  # transformers' generate reads the dense model's weights
                result["weight_bytes"] = report["variants"].get("dense", {}).get("weight_bytes", 0)
                result["cache_bytes"] = report["variants"].get("dense", {}).get("cache_bytes", 0)
            result.update(add_floors(result, copy_gbps))
            report["variants"][variant] = result
            line = "  ".join(
                f"G={g}: TTNT {r['ttnt_ms']:.3f} ms (floor {result['floor_ms']:.3f}), total {r['total_ms'] / 1e3:.2f} s"
                for g, r in result["settings"].items()
            )
            print(f"  {variant:<16} TTFT {result['ttft_ms']:.1f} ms  {line}  (warm-up {result['warmup_s']} s)")
            output.write_text(json.dumps(report, indent=2))
            if adapter is not None:
                release_decode_caches(target)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        if adapter is not None:
            model = target.unload()
    del model
    return report


def add_floors(result: dict, copy_gbps: float) -> dict:
    """Byte floors of one decode step in ms: weights alone, and weights plus the whole static KV cache."""
    if not result.get("weight_bytes"):
        return {}
    to_ms = 1e3 / (copy_gbps * 1e9)
    return {
        "floor_ms": round(result["weight_bytes"] * to_ms, 4),
        "floor_with_kv_ms": round((result["weight_bytes"] + result["cache_bytes"]) * to_ms, 4),
    }


# ---- the markdown report ----


def markdown(reports: list[dict]) -> str:
    """Tables per (device, model, setting) and the issue's targets, from one or more JSON reports."""
    merged: dict[tuple, dict] = {}
    for report in sorted(reports, key=lambda r: r["date"]):  # later runs replace earlier ones of a variant
        key = (report["device"], report["model"], report["batch"], report["prompt"])
        entry = merged.setdefault(key, {"meta": report, "variants": {}})
        entry["variants"].update(report["variants"])
        entry["meta"] = report
    lines = []
    for (device, model, batch, prompt), entry in merged.items():
        meta, variants = entry["meta"], entry["variants"]
        bandwidth = meta["copy_gb_per_s"]
        lines += [
            f"## {model} on {device}, batch {batch}, prompt {prompt}",
            "",
            f"torch {meta['torch']}, transformers {meta['transformers']}, triton {meta['triton']}, CUDA "
            f"{meta['cuda']}, commit {meta['commit']}, {meta['date']}; compile={meta['compile']}; "
            f"measured copy bandwidth {bandwidth:.0f} GB/s; r = {meta['rank']}.",
            "",
        ]
        settings = sorted({int(s) for v in variants.values() for s in v.get("settings", {})})
        for setting in settings:
            lines += _setting_table(variants, str(setting), prompt, bandwidth)
    return "\n".join(lines) + "\n"


def _setting_table(variants: dict, setting: str, prompt: int, bandwidth: float) -> list[str]:
    ran = {n: v for n, v in variants.items() if setting in v.get("settings", {})}
    dense = ran.get("dense")
    lines = [
        f"### {prompt} + {setting}",
        "",
        "| variant | TTFT ms | TTFT / dense | TTNT ms | total s | weights GB/step | floor ms | TTNT / floor "
        "| TTNT / floor (+KV) | speedup vs dense | saved / ideal saved | extra GB | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for name in VARIANTS:
        if name not in ran:
            if "error" in variants.get(name, {}):
                checks.append(f"- {name} FAILED: {variants[name]['error'].splitlines()[0][:300]}")
            continue
        v, s = ran[name], ran[name]["settings"][setting]
        floor = v.get("floor_ms")
        ratio = f"{s['ttnt_ms'] / floor:.2f}" if floor else ""
        ratio_kv = f"{s['ttnt_ms'] / v['floor_with_kv_ms']:.2f}" if floor else ""
        ttft_ratio = speedup = saving = ""
        if dense is not None and name != "dense":
            dense_s = dense["settings"][setting]
            ttft_ratio = f"{v['ttft_ms'] / dense['ttft_ms']:.3f}"
            speedup = f"{dense_s['ttnt_ms'] / s['ttnt_ms']:.3f}x"
            ideal = (dense["weight_bytes"] - v["weight_bytes"]) / (bandwidth * 1e9) * 1e3
            saved = dense_s["ttnt_ms"] - s["ttnt_ms"]
            saving = f"{saved / ideal:.0%}" if ideal > 0 else ""
            if name.startswith("caprese") and ideal > 0:
                checks.append(
                    _check(
                        f"{name}: time saved / (bytes saved / bandwidth)", saved / ideal, ">=", TARGET_SAVING_FRACTION
                    )
                )
            if name in TARGET_SPEEDUP:
                checks.append(
                    _check(f"{name}: speedup vs dense", dense_s["ttnt_ms"] / s["ttnt_ms"], ">=", TARGET_SPEEDUP[name])
                )
            if name.startswith("caprese"):  # the prefill calibrates the backbone; it should cost what dense costs
                checks.append(_check(f"{name}: TTFT / dense TTFT", v["ttft_ms"] / dense["ttft_ms"], "<=", 1.05))
            if name == "hf-dense":
                checks.append(
                    _check("dense FastDecoder TTNT / transformers generate TTNT", dense_s["ttnt_ms"] / s["ttnt_ms"],
                           "<=", 1.0)
                )  # fmt: skip
        if floor and (name == "dense" or name.startswith("caprese")):
            checks.append(_check(f"{name}: TTNT / weight floor", s["ttnt_ms"] / floor, "<=", TARGET_FLOOR_RATIO))
        backbone = name.removeprefix("caprese-")
        if name.startswith("caprese") and backbone in ran:
            vs = s["ttnt_ms"] / ran[backbone]["settings"][setting]["ttnt_ms"]
            checks.append(_check(f"{name}: TTNT / TTNT of {backbone}", vs, "<=", TARGET_VS_BACKBONE))
        extra = f"{v['extra_bytes'] / 1e9:.2f}" if "extra_bytes" in v else ""
        lines.append(
            f"| {name} | {v['ttft_ms']:.1f} | {ttft_ratio} | {s['ttnt_ms']:.3f} | {s['total_ms'] / 1e3:.2f} | "
            f"{v['weight_bytes'] / 1e9:.2f} | {floor or 0:.3f} | {ratio} | {ratio_kv} | {speedup} | {saving} | {extra} | "
            f"{v.get('peak_memory_gib', '')} |"
        )  # fmt: skip
    return [*lines, "", *checks, ""]


def _check(what: str, value: float, relation: str, target: float) -> str:
    """A line saying whether one of the issue's targets is met."""
    met = value >= target if relation == ">=" else value <= target
    return f"- {'met' if met else 'NOT met'}: {what} = {value:.3f} (target {relation} {target})"


def summarize(folder: Path) -> Path:
    """Write ``summary.md`` from every ``e2e_*.json`` in ``folder``; returns its path."""
    reports = [json.loads(path.read_text()) for path in sorted(folder.glob("e2e_*.json"))]
    if not reports:
        raise FileNotFoundError(f"No e2e_*.json results in {folder}.")
    path = folder / "summary.md"
    path.write_text("# End-to-end decode benchmark\n\n" + markdown(reports))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--generate", nargs="+", type=int, default=[256, 2048], help="new tokens per setting")
    parser.add_argument("--prompt", type=int, default=2048, help="prompt tokens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=256, help="rank r of the low-rank correction")
    parser.add_argument("--compile", default="reduce-overhead", choices=COMPILE_MODES, help="FastDecoder's compile")
    parser.add_argument("--warmup-tokens", type=int, default=8)
    parser.add_argument(
        "--unrolled", action="store_true", help="compile the whole unrolled step, not one layer reused (fallback)"
    )
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR)
    parser.add_argument("--summarize", action="store_true", help="only write summary.md from the saved JSON")
    parser.add_argument("--smoke", action="store_true", help="a tiny config on a CPU: checks the script")
    args = parser.parse_args(argv)

    if args.summarize:
        try:
            print(f"wrote {summarize(args.output_dir)}")
        except FileNotFoundError as error:
            print(f"{error} Run the benchmark first.", file=sys.stderr)
            return 1
        return 0
    if args.smoke:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        models = ["smoke"]
        args.prompt, args.generate, args.rank, args.warmup_tokens = 16, [4, 8], 8, 2
        if device == "cpu":
            args.compile = "none"
            torch.set_num_threads(1)  # tiny matmuls: more threads only contend
    else:
        if not torch.cuda.is_available():
            print(
                "bench_e2e.py times decoding on a GPU, but torch.cuda.is_available() is False on this machine "
                f"(torch {torch.__version__}). Run it on a machine with an NVIDIA GPU, or pass --smoke to check the "
                "script on a CPU.",
                file=sys.stderr,
            )
            return 2
        device, models = "cuda", args.models
    if args.batch < 1 or args.prompt < 1 or min(args.generate) < 2:
        parser.error("--batch and --prompt must be >= 1 and every --generate >= 2")

    meta = run_metadata(device)
    copy_gbps = copy_bandwidth_gbps(device)
    print(f"{meta['device']}  torch {meta['torch']}  transformers {meta['transformers']}  triton {meta['triton']}")
    print(f"commit {meta['commit']}; copy bandwidth {copy_gbps:.0f} GB/s (read + write)")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    reports = []
    for name in models:
        tag = "smoke" if args.smoke else slug(meta["device"])
        output = args.output_dir / f"e2e_{tag}_{name}_{'-'.join(args.variants)}_{stamp}.json"
        reports.append(run_model(name, args, device, meta, copy_gbps, output))
        print(f"wrote {output}")
    table = args.output_dir / f"e2e_{'smoke' if args.smoke else slug(meta['device'])}_{stamp}.md"
    table.write_text("# End-to-end decode benchmark\n\n" + markdown(reports))
    print(f"wrote {table}\n")
    print(table.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
