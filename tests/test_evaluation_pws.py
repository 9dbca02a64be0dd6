"""The both-orders pairwise rule and the Pairwise Winning Score, by hand cases."""

import pytest

from gradfilter_ray.evaluation.pws import outcome, pairwise_winning_score, summarise


# score_a_first is (A, B); score_a_second is what the judge returns with B first, i.e. (B, A).
@pytest.mark.parametrize(
    ("a_first", "a_second", "expected"),
    [
        ((8, 6), (5, 9), "win"),  # higher in both orders
        ((8, 6), (7, 7), "win"),  # higher in one, equal in the other
        ((7, 7), (6, 8), "win"),  # equal first, higher second
        ((5, 9), (9, 5), "lose"),  # lower in both
        ((6, 8), (7, 7), "lose"),  # lower in one, equal in the other
        ((7, 7), (8, 6), "lose"),
        ((8, 6), (8, 6), "tie"),  # one win, one loss: the judge followed position
        ((6, 8), (6, 8), "tie"),
        ((7, 7), (7, 7), "tie"),  # equal in both
        ((8.5, 8.0), (8.0, 8.5), "win"),  # fractional scores compare as numbers
        (None, (5, 9), "invalid"),
        ((8, 6), None, "invalid"),
        (None, None, "invalid"),
    ],
)
def test_both_orders_rule(a_first, a_second, expected):
    assert outcome(a_first, a_second) == expected


def test_rule_is_antisymmetric():
    # Swapping the roles of A and B must turn every win into a loss and keep ties.
    flip = {"win": "lose", "lose": "win", "tie": "tie"}
    for a in range(1, 4):
        for b in range(1, 4):
            for c in range(1, 4):
                for d in range(1, 4):
                    # A's view: (A,B)=(a,b), (B,A)=(c,d); B's view: (B,A)=(c,d) first, (A,B)=(a,b) second
                    assert outcome((c, d), (a, b)) == flip[outcome((a, b), (c, d))]


def test_pws_arithmetic():
    assert pairwise_winning_score(3, 1, 1) == pytest.approx(1.4)
    assert pairwise_winning_score(0, 5, 0) == 1.0
    assert pairwise_winning_score(4, 0, 0) == 2.0
    assert pairwise_winning_score(0, 0, 4) == 0.0


def test_pws_all_zero_raises():
    with pytest.raises(ValueError):
        pairwise_winning_score(0, 0, 0)


def test_summarise_counts_and_excludes_invalid():
    got = summarise(["win", "win", "invalid", "tie", "win", "lose", "invalid"])
    assert got == {"win": 3, "tie": 1, "lose": 1, "invalid": 2, "pws": pytest.approx(1.4)}


def test_summarise_all_invalid_has_no_pws():
    assert summarise(["invalid"]) == {"win": 0, "tie": 0, "lose": 0, "invalid": 1, "pws": None}
    assert summarise([])["pws"] is None


def test_summarise_rejects_unknown_outcome():
    with pytest.raises(ValueError, match="unknown outcome"):
        summarise(["win", "draw"])
