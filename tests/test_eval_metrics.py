"""Evaluation metrics and plots, each checked alone against hand-computed values."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations

import pytest
import torch

from caprese_peft.eval import (
    agreement_length,
    agreement_lengths,
    check_answer,
    coverage_curve,
    extract_gsm8k_answer,
    length_summary,
    mean_token_kl,
    pass_at_k,
    perplexity,
    plot_bars,
    plot_coverage,
    plot_density_sweep,
    plot_length_histograms,
    token_kl,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# real GSM8K training solutions
NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
WENG = "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"
BETTY = (
    "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\nBetty's grandparents gave her 15 * 2 = $<<15*2=30>>30."
    "\nThis means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5"
)


def _logits(probs: list[list[list[float]]]) -> torch.Tensor:
    return torch.tensor(probs).log()


# --- KL and perplexity -------------------------------------------------------------------------------------------


def test_token_kl_identical_logits_is_zero():
    logits = torch.randn(2, 5, 11)
    kl = token_kl(logits, logits.clone(), torch.ones(2, 5, dtype=torch.bool))
    assert kl.shape == (2, 5) and kl.dtype == torch.float32
    assert torch.allclose(kl, torch.zeros(2, 5), atol=1e-6)


def test_token_kl_two_token_distribution_by_hand():
    teacher = _logits([[[0.5, 0.5], [0.9, 0.1]]])
    student = _logits([[[0.25, 0.75], [0.9, 0.1]]]) + 3.0  # a shift of the logits changes nothing
    kl = token_kl(teacher, student, torch.tensor([[True, True]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # = 0.5 ln(4/3)
    assert kl[0, 0].item() == pytest.approx(expected, rel=1e-5)
    assert kl[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    # the direction is KL(teacher || student): swapping the arguments gives a different number
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert token_kl(student, teacher, torch.tensor([[True, False]]))[0, 0].item() == pytest.approx(reverse, rel=1e-5)


def test_token_kl_masks_tokens_and_ignores_their_values():
    teacher = _logits([[[0.5, 0.5], [0.5, 0.5]]])
    student = _logits([[[0.25, 0.75], [0.5, 0.5]]])
    teacher[0, 1] = float("nan")  # padding garbage must not leak
    mask = torch.tensor([[1, 0]])
    kl = token_kl(teacher, student, mask)
    assert kl[0, 1].item() == 0.0
    assert mean_token_kl(teacher, student, mask) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)


def test_token_kl_zero_teacher_probability_contributes_nothing():
    teacher = torch.tensor([[[0.0, float("-inf")]]])  # p_t = (1, 0)
    student = _logits([[[0.5, 0.5]]])
    assert token_kl(teacher, student, torch.ones(1, 1))[0, 0].item() == pytest.approx(math.log(2), rel=1e-6)


def test_token_kl_runs_in_fp32_for_bf16_inputs():
    teacher = torch.randn(1, 3, 7).bfloat16()
    student = torch.randn(1, 3, 7).bfloat16()
    kl = token_kl(teacher, student, torch.ones(1, 3, dtype=torch.bool))
    expected = token_kl(teacher.float(), student.float(), torch.ones(1, 3, dtype=torch.bool))
    assert kl.dtype == torch.float32 and torch.equal(kl, expected)
    assert bool((kl >= 0).all())


def test_kl_bad_input_fails_early():
    with pytest.raises(ValueError, match="differ in shape"):
        token_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2))
    with pytest.raises(ValueError, match="mask has shape"):
        token_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(2, 1))
    with pytest.raises(ValueError, match="no token"):
        mean_token_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2))


def test_perplexity_by_hand():
    logits = _logits([[[0.5, 0.25, 0.25], [0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]]])
    labels = torch.tensor([[0, 1, -100]])
    mask = torch.tensor([[True, True, False]])
    # exp(-(ln 0.5 + ln 0.25) / 2) = sqrt(8)
    assert perplexity(logits, labels, mask) == pytest.approx(math.sqrt(8), rel=1e-5)
    uniform = torch.zeros(2, 4, 5)
    assert perplexity(uniform, torch.randint(0, 5, (2, 4)), torch.ones(2, 4)) == pytest.approx(5.0, rel=1e-5)


# --- agreement ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reference, candidate, expected",
    [
        ([5, 6, 7, 8], [5, 6, 9, 8], 2),
        ([5, 6, 7], [5, 6, 7], 3),
        ([5, 6, 7], [5, 6], 2),  # a prefix agrees over its whole length
        ([5, 6], [5, 6, 7, 8], 2),
        ([1, 2], [3, 2], 0),
        ([], [1], 0),
    ],
)
def test_agreement_length(reference, candidate, expected):
    assert agreement_length(reference, candidate) == expected
    assert agreement_length(torch.tensor(reference, dtype=torch.long), torch.tensor(candidate)) == expected


def test_agreement_lengths_batched():
    assert agreement_lengths([[1, 2, 3], [4, 5], [7]], [[1, 2, 0], [4, 5], [8]]) == [2, 2, 0]
    with pytest.raises(ValueError, match="pair them"):
        agreement_lengths([[1]], [[1], [2]])


# --- answers -----------------------------------------------------------------------------------------------------


def test_extract_gsm8k_answer():
    assert extract_gsm8k_answer(NATALIA) == "72"
    assert extract_gsm8k_answer(WENG) == "10"
    assert extract_gsm8k_answer("So the total is\n#### 1,250") == "1250"
    assert extract_gsm8k_answer("#### -3.") == "-3"
    assert extract_gsm8k_answer("no final answer marker") is None
    assert extract_gsm8k_answer("####   ") is None
    assert extract_gsm8k_answer(None) is None


@pytest.mark.parametrize(
    "response, reference, expected",
    [
        ("April 48, May 48/2 = 24, so she sold 72 clips.", NATALIA, True),  # the last number
        ("The answer is 72. Altogether she sold 48 and 24 clips.", NATALIA, True),  # "answer is" beats later numbers
        ("The answer is 72. Check: 48 + 24 = 72, and 72 - 24 = 48.", NATALIA, False),  # ... but not a later "= 48"
        (r"She sold 48 + 24 clips, so \boxed{72}", NATALIA, True),
        ("She sold 48 + 24 = 96 clips.", NATALIA, False),  # wrong
        ("She sold 72 clips, 24 of them in May.", NATALIA, False),  # math_verify reads the last number, 24
        ("She earns $0.2 a minute, so she earned $10.", WENG, True),
        ("0.2 x 50 = 10.00", WENG, True),
        ("She earned 12 dollars.", WENG, False),
        ("Betty needs 100 - 50 - 30 - 15 = 5 more dollars.", BETTY, True),
        ("The final answer is 5. I hope it is correct.", BETTY, True),
        ("The answer is 0.5", r"\boxed{\frac{1}{2}}", True),
        (r"so the probability is $\frac{2}{4}$", r"\boxed{\frac{1}{2}}", True),
        ("The answer is 1,000.", "#### 1,000", True),
        (r"\boxed{3}", "72", False),
    ],
)
def test_check_answer(response, reference, expected):
    assert check_answer(response, reference) is expected


@pytest.mark.parametrize(
    "response, reference",
    [
        ("", NATALIA),
        ("I do not know.", NATALIA),
        (r"}}}{{\frac\boxed{", NATALIA),
        (r"\boxed{", BETTY),
        ("x" * 20000, BETTY),
        (None, NATALIA),
        ("72", None),
        ("72", "#### "),  # a reference without an answer
        ("72", "no number in this reference"),
    ],
)
def test_check_answer_never_raises_on_odd_text(response, reference):
    assert check_answer(response, reference) is False


def test_check_answer_works_outside_the_main_thread():
    # math_verify's default timeouts use signal.alarm, which raises outside the main thread
    with ThreadPoolExecutor(max_workers=1) as pool:
        correct, thread = pool.submit(
            lambda: (check_answer("so she sold 72 clips.", NATALIA), threading.current_thread())
        ).result()
    assert thread is not threading.main_thread()
    assert correct is True


# --- pass@k and coverage -----------------------------------------------------------------------------------------


def _brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_by_hand_and_large_n():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0
    # the product form stays accurate where binomials would overflow a float
    assert pass_at_k(2000, 1, 1) == pytest.approx(1 / 2000, rel=1e-9)
    assert pass_at_k(2000, 1000, 1000) == pytest.approx(1.0 - math.comb(1000, 1000) / math.comb(2000, 1000), abs=1e-12)


def test_pass_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match="k must lie"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="c \\(correct samples\\)"):
        pass_at_k(3, 4, 1)
    with pytest.raises(TypeError):
        pass_at_k(3.0, 1, 1)


def test_coverage_curve_by_hand():
    correct = [[True, False, False, False], [False, False, False, False]]
    # problem A: pass@1 = 1/4, pass@2 = 1/2, pass@4 = 1; problem B never solves
    assert coverage_curve(correct, [1, 2, 4]) == pytest.approx([0.125, 0.25, 0.5])
    with pytest.raises(ValueError, match="exceed"):
        coverage_curve(correct, [5])


def test_length_summary_by_hand():
    summary = length_summary([10, 1, 9, 2, 8, 3, 7, 4, 6, 5])
    assert summary == {"mean": 5.5, "median": 5.5, "p90": pytest.approx(9.1), "max": 10, "count": 10}
    assert length_summary([7]) == {"mean": 7.0, "median": 7.0, "p90": 7.0, "max": 7, "count": 1}
    with pytest.raises(ValueError, match="empty"):
        length_summary([])


# --- plots -------------------------------------------------------------------------------------------------------


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1000  # axes, lines and text, not an empty image


def test_plot_coverage_writes_png(tmp_path):
    path = plot_coverage(
        {"full": ([1, 2, 4], [0.3, 0.45, 0.6]), "Caprese": ([0.8, 1.6, 3.2], [0.28, 0.44, 0.61])},
        tmp_path / "sub" / "coverage.png",
    )
    assert path == tmp_path / "sub" / "coverage.png"
    _assert_png(path)


def test_plot_length_histograms_writes_png(tmp_path):
    path = plot_length_histograms(
        {"full": [100, 120, 300, 90], "CATS": [150, 400, 380], "same": [5]}, tmp_path / "l.png"
    )
    _assert_png(path)


def test_plot_density_sweep_writes_png(tmp_path):
    rows = [
        {"method": m, "density": d, "accuracy": a}
        for m, pts in {"CATS": [(0.3, 0.2), (0.5, 0.4), (0.7, 0.55)], "Caprese": [(0.5, 0.6), (0.3, 0.5)]}.items()
        for d, a in pts
    ]
    _assert_png(plot_density_sweep(rows, str(tmp_path / "sweep.png")))
    with pytest.raises(ValueError, match="lack one of the keys"):
        plot_density_sweep([{"density": 0.5}], tmp_path / "bad.png")


def test_plot_bars_writes_png(tmp_path):
    panels = {"accuracy": {"dense": 0.5, "caprese": 0.4}, "agreement": {"dense": 12.0, "caprese": 7.5}}
    _assert_png(plot_bars(panels, tmp_path / "bars.png", ylims={"accuracy": (0.0, 1.0)}))
