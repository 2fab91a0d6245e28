"""lm-evaluation-harness on Caprese adapters: its own command line, with ``caprese_peft`` imported first.

lm-eval's ``--model hf --model_args pretrained=BASE,peft=ADAPTER`` loads the adapter with
``PeftModel.from_pretrained``, which knows the CAPRESE type only once ``caprese_peft`` is imported.
``caprese-peft lm-eval ARGS`` and ``python -m caprese_peft.lm_eval ARGS`` take exactly lm-eval's arguments.

Generation tasks (``generate_until``, e.g. gsm8k) exercise Caprese: the prompt runs dense and every generated
token the sparse block plus the correction. Log-likelihood tasks score given continuations in one forward
pass over prompt and continuation, which is a prefill, so they measure the dense model.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .extras import MissingExtraError, require


def main(argv: Sequence[str] | None = None) -> None:
    """Run lm-eval's command line on ``argv`` (default: this process's arguments) with Caprese registered."""
    import caprese_peft  # noqa: F401  (registers the CAPRESE PEFT type before lm-eval loads the adapter)

    try:
        cli_evaluate = require("lm_eval.__main__", "lm-evaluation-harness").cli_evaluate
    except MissingExtraError as error:
        raise SystemExit(f"caprese-peft lm-eval: {error}") from None
    args = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    # lm-eval parses sys.argv itself (and inserts its 'run' subcommand there when none is given)
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
