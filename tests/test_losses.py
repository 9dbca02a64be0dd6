"""The shared response-only loss, and that scoring only the trailing window gives the same per-example losses."""

import torch

from gradfilter_ray.losses import IGNORE_INDEX, per_example_losses, scored_window


def test_window_losses_equal_full_losses():
    torch.manual_seed(0)
    labels = torch.full((3, 10), IGNORE_INDEX)
    labels[0, 6:] = torch.randint(0, 7, (4,))
    labels[1, 4:9] = torch.randint(0, 7, (5,))
    logits = torch.randn(3, 10, 7, dtype=torch.float64)
    window = scored_window(labels)
    assert window == 10 - 4 + 1
    full, n_full = per_example_losses(logits, labels)
    part, n_part = per_example_losses(logits[:, -window:], labels[:, -window:])
    torch.testing.assert_close(full, part)
    assert n_full.tolist() == n_part.tolist() == [4, 5, 0]
    assert part[2] == 0.0  # no scored token: defined as 0, no division by zero
    # hand check of row 0: mean CE of its 4 labelled tokens, each predicted from the previous position
    expected = torch.stack(
        [torch.nn.functional.cross_entropy(logits[0, t - 1 : t], labels[0, t : t + 1]) for t in range(6, 10)]
    ).mean()
    torch.testing.assert_close(full[0], expected)


def test_window_of_an_unlabelled_batch():
    assert scored_window(torch.full((2, 5), IGNORE_INDEX)) == 1
