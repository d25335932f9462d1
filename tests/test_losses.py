import math

import torch

from vlmkit.losses import infonce_loss, siglip_loss


def _pairs(n=6, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, e, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, e, generator=g), dim=-1)
    return img, txt


def test_infonce_equals_the_loop_formulation():
    img, txt = _pairs()
    scale = torch.tensor(7.0)
    n = len(img)
    total = 0.0
    for i in range(n):  # image i must pick caption i among all captions, and vice versa
        row = [math.exp(scale * float(img[i] @ txt[j])) for j in range(n)]
        col = [math.exp(scale * float(txt[i] @ img[j])) for j in range(n)]
        total += -math.log(row[i] / sum(row)) - math.log(col[i] / sum(col))
    assert abs(infonce_loss(img, txt, scale).item() - total / (2 * n)) < 1e-5


def test_siglip_equals_the_loop_formulation():
    img, txt = _pairs(seed=1)
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    n = len(img)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * float(img[i] @ txt[j]) + bias
            total += math.log1p(math.exp(-z * float(logit)))
    assert abs(siglip_loss(img, txt, scale, bias).item() - total / n) < 1e-4


def test_perfect_alignment_gives_low_loss():
    img, _ = _pairs(n=4, e=4)
    eye = torch.eye(4)
    assert infonce_loss(eye, eye, torch.tensor(100.0)).item() < 1e-6
    assert infonce_loss(eye, eye.roll(1, 0), torch.tensor(100.0)).item() > 50


def test_losses_backpropagate_to_the_scale():
    img, txt = _pairs()
    scale = torch.tensor(5.0, requires_grad=True)
    bias = torch.tensor(-3.0, requires_grad=True)
    (infonce_loss(img, txt, scale) + siglip_loss(img, txt, scale, bias)).backward()
    assert scale.grad is not None and bias.grad is not None


def test_infonce_leaves_identical_captions_out_of_the_negatives():
    img, txt = _pairs(n=6, seed=2)
    ids = torch.tensor([0, 1, 0, 2, 1, 0])  # pairs 0, 2, 5 share a caption; so do 1 and 4
    scale = torch.tensor(7.0)
    n = len(img)
    total = 0.0
    for i in range(n):  # the rivals of pair i are the pairs with a different caption
        keep = [j for j in range(n) if j == i or ids[j] != ids[i]]
        row = [math.exp(scale * float(img[i] @ txt[j])) for j in keep]
        col = [math.exp(scale * float(txt[i] @ img[j])) for j in keep]
        mine = keep.index(i)
        total += -math.log(row[mine] / sum(row)) - math.log(col[mine] / sum(col))
    assert abs(infonce_loss(img, txt, scale, ids).item() - total / (2 * n)) < 1e-5
    # All-distinct ids change nothing.
    assert torch.allclose(infonce_loss(img, txt, scale, torch.arange(n)), infonce_loss(img, txt, scale))


def test_siglip_counts_identical_captions_as_matches():
    img, txt = _pairs(seed=3)
    ids = torch.tensor([0, 1, 0, 2, 1, 0])
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    n = len(img)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if ids[i] == ids[j] else -1.0
            logit = scale * float(img[i] @ txt[j]) + bias
            total += math.log1p(math.exp(-z * float(logit)))
    assert abs(siglip_loss(img, txt, scale, bias, ids).item() - total / n) < 1e-4


def test_hard_negatives_join_the_image_to_text_side_only():
    img, txt = _pairs(n=5, seed=4)
    neg = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(5)), dim=-1)
    scale, bias = torch.tensor(7.0), torch.tensor(-4.0)
    n = len(img)
    nce, sig = 0.0, 0.0
    for i in range(n):  # image i must pick caption i among all captions and all hard negatives
        row = [math.exp(scale * float(img[i] @ t)) for t in [*txt, *neg]]
        col = [math.exp(scale * float(txt[i] @ img[j])) for j in range(n)]
        nce += -math.log(row[i] / sum(row)) - math.log(col[i] / sum(col))
        for j, t in enumerate([*txt, *neg]):
            z = 1.0 if j == i else -1.0
            sig += math.log1p(math.exp(-z * float(scale * float(img[i] @ t) + bias)))
    assert abs(infonce_loss(img, txt, scale, negatives=neg).item() - nce / (2 * n)) < 1e-5
    assert abs(siglip_loss(img, txt, scale, bias, negatives=neg).item() - sig / n) < 1e-4
    # A hard negative identical to the true caption makes the image->text choice a coin toss.
    assert infonce_loss(img, txt, scale, negatives=txt) > infonce_loss(img, txt, scale)
