"""Quantizer, gradient reversal and tokenizer model: unit tests with hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from fmrilm.models.alignment import AlignmentConfig, AlignmentHead, dann_coefficient, grad_reverse
from fmrilm.models.quantizer import VectorQuantizer, perplexity, spherical_kmeans
from fmrilm.models.tokenizer import FMRITokenizer, TokenizerConfig, r2_per_roi


def _vq(k=4, dim=3, **kw):
    vq = VectorQuantizer(k, dim, **kw)
    vq.initialized.fill_(True)
    return vq


def test_straight_through_gradient():
    torch.manual_seed(0)
    vq = _vq(beta=0.0)
    z = torch.randn(6, 3, requires_grad=True)
    g = torch.randn(6, 3)
    (vq(z).quantized * g).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=-1) * g).sum().backward()  # the quantizer passes gradients straight through
    torch.testing.assert_close(z.grad, z2.grad)


def test_quantized_values_are_codes_and_commitment_is_beta_mse():
    vq = _vq(beta=0.25).eval()
    z = F.normalize(torch.randn(5, 3), dim=-1)
    out = vq(z)
    torch.testing.assert_close(out.quantized, vq.codebook[out.codes])
    assert out.commitment_loss.item() == pytest.approx(0.25 * F.mse_loss(z, vq.codebook[out.codes]).item(), rel=1e-5)
    assert torch.equal(out.codes, (z @ vq.codebook.T).argmax(1))


def test_ema_update_matches_a_hand_computation():
    vq = _vq(k=2, dim=2, decay=0.5, eps=0.0, dead_threshold=0.0).train()
    vq.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    vq.embed_sum.copy_(vq.codebook)
    vq.cluster_size.fill_(1.0)
    z = F.normalize(torch.tensor([[1.0, 0.2], [1.0, -0.1], [0.1, 1.0]]), dim=-1)
    vq(z)
    counts = torch.tensor([2.0, 1.0])
    sums = torch.stack([z[0] + z[1], z[2]])
    size = 0.5 * 1.0 + 0.5 * counts
    embed = 0.5 * torch.eye(2) + 0.5 * sums
    torch.testing.assert_close(vq.cluster_size, size)
    torch.testing.assert_close(vq.embed_sum, embed)
    torch.testing.assert_close(vq.codebook, F.normalize(embed / size[:, None], dim=-1))
    torch.testing.assert_close(vq.usage, counts)


def test_kmeans_init_finds_the_clusters():
    torch.manual_seed(1)
    centers = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    z = torch.cat([centers[0] + 0.05 * torch.randn(50, 3), centers[1] + 0.05 * torch.randn(50, 3)])
    vq = VectorQuantizer(2, 3).train()
    assert not bool(vq.initialized)
    vq(z)
    assert bool(vq.initialized)
    sim = vq.codebook @ centers.T
    assert sorted(sim.max(dim=1).values.tolist())[0] > 0.95
    c = spherical_kmeans(F.normalize(z, dim=-1), 5)  # more codes than clusters still works
    assert c.shape == (5, 3) and torch.allclose(c.norm(dim=1), torch.ones(5))


def test_kmeans_init_waits_for_as_many_vectors_as_codes():
    """One token per window gives a step few vectors: the codebook is fitted once 16 codes have
    seen 16 vectors, not duplicated from the first 4."""
    torch.manual_seed(3)
    centers = F.normalize(torch.randn(16, 8), dim=-1)
    vq = VectorQuantizer(16, 8).train()
    start = vq.codebook.clone()
    for step in range(4):
        vq(centers[4 * step : 4 * step + 4] + 0.01 * torch.randn(4, 8))
        assert bool(vq.initialized) == (step == 3)
        if step < 3:
            assert torch.equal(vq.codebook, start) and vq.usage.sum() == 0  # nothing updated before the fit
    assert (vq.codebook @ centers.T).max(dim=0).values.min() > 0.9  # every centre has its own code


def test_dead_codes_are_restarted_from_the_batch():
    torch.manual_seed(2)
    vq = _vq(k=8, dim=3, decay=0.5, dead_threshold=0.3).train()
    vq.codebook.copy_(F.normalize(torch.tensor([[1.0, 0, 0]] + [[-1.0, 0.01 * i, 0] for i in range(7)]), dim=-1))
    vq.embed_sum.copy_(vq.codebook)
    z = F.normalize(torch.tensor([[1.0, 0.1, 0.0]] * 10) + 0.01 * torch.randn(10, 3), dim=-1)
    vq(z)  # codes 1..7 get nothing: EMA size 1 -> 0.5, still above the threshold
    out = vq(z)  # 0.5 -> 0.25, below 0.3: all seven restart
    assert out.restarted == 7
    assert (vq.codebook[1:] @ z.T).max(dim=1).values.min() > 0.95  # restarted near batch vectors


def test_perplexity_formula():
    assert perplexity(torch.tensor([5.0, 5.0, 5.0, 5.0])).item() == pytest.approx(4.0)
    assert perplexity(torch.tensor([7.0, 0.0, 0.0])).item() == pytest.approx(1.0)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert perplexity(p * 8).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()))


def test_gradient_reversal_and_dann_schedule():
    x = torch.randn(4, 3, requires_grad=True)
    y = grad_reverse(x, 0.7)
    torch.testing.assert_close(y, x)
    g = torch.randn(4, 3)
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, -0.7 * g)
    assert dann_coefficient(0.0) == 0.0
    assert dann_coefficient(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert dann_coefficient(1.0) > 0.999


def test_domain_classifier_gradient_is_reversed_for_the_fmri_side():
    torch.manual_seed(3)
    head = AlignmentHead(8, 6, AlignmentConfig(tokens_per_step=16))
    feats = torch.randn(2, 8, 8, requires_grad=True)
    text = torch.randn(20, 6)
    loss, _ = head.domain_loss(feats, text, coef=1.0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    g_rev = feats.grad.clone()
    feats.grad = None
    head.zero_grad()
    loss0, _ = head.domain_loss(feats, text, coef=-1.0, generator=torch.Generator().manual_seed(0))
    loss0.backward()
    torch.testing.assert_close(g_rev, -feats.grad)  # same loss, opposite encoder gradient


def test_contrastive_loss_prefers_matching_pairs():
    torch.manual_seed(4)
    head = AlignmentHead(4, 4, AlignmentConfig(contrastive_dim=4))
    with torch.no_grad():
        head.fmri_proj.weight.copy_(torch.eye(4))
        head.fmri_proj.bias.zero_()
        head.text_proj.weight.copy_(torch.eye(4))
        head.text_proj.bias.zero_()
    emb = torch.eye(4)
    feats = emb[:, None, :].repeat(1, 3, 1)
    mask = torch.ones(4, dtype=torch.bool)
    matched = head.contrastive_loss(feats, emb, ["a", "b", "c", "d"], mask)
    shuffled = head.contrastive_loss(feats, emb[[1, 2, 3, 0]], ["a", "b", "c", "d"], mask)
    assert matched < shuffled


def test_tokenizer_shapes_any_rois_and_patch_errors():
    m = FMRITokenizer(TokenizerConfig(patch=8, width=16, heads=2, depth=1, code_dim=8, num_codes=16))
    for rois in (3, 11):
        out = m(torch.randn(2, rois, 24))
        assert out.recon.shape == (2, rois, 24) and out.codes.shape == (2, rois, 3) and out.features.shape == (2, rois * 3, 16)
        assert m.tokenize(torch.randn(2, rois, 24)).shape == (2, rois, 3)
    with pytest.raises(ValueError, match="not a multiple of the patch length"):
        m(torch.randn(1, 3, 20))


def test_state_layout_has_one_whole_brain_code_per_patch_for_any_rois():
    torch.manual_seed(0)
    m = FMRITokenizer(TokenizerConfig(layout="state", patch=2, width=16, heads=2, depth=1, code_dim=8, num_codes=16, spectrum_weight=1.0))
    for rois in (3, 11):
        out = m(torch.randn(2, rois, 8))
        assert out.recon.shape == (2, rois, 8) and out.codes.shape == (2, 1, 4) and out.features.shape == (2, 4, 16)
        assert out.spectrum_loss.item() > 0
        codes, feats = m.tokenize_with_features(torch.randn(2, rois, 8))
        assert codes.shape == (2, 1, 4) and feats.shape == (2, 1, 4, 16)
    x = torch.randn(2, 5, 8)
    m.eval()
    x2 = x[:, [1, 0, 2, 3, 4]]  # swapping two ROIs' signals changes the state: the encoder knows which ROI is which
    assert not torch.equal(m.tokenize_with_features(x)[1], m.tokenize_with_features(x2)[1])


def test_connectivity_layout_codes_each_window_whole_and_rebuilds_its_correlations():
    torch.manual_seed(0)
    cfg = TokenizerConfig(layout="connectivity", patch=20, width=16, heads=2, depth=1, code_dim=8, num_codes=16)
    m = FMRITokenizer(cfg)
    assert m.patch_embed is None and m.to_patch is None  # no waveform in or out: every weight trains (DDP)
    for rois in (3, 11):
        x = torch.randn(4, rois, 20)
        out = m(x)
        assert out.codes.shape == (4, 1, 1) and out.features.shape == (4, 1, 16) and out.recon.shape == (4, rois, rois)
        target = m.target(x)
        torch.testing.assert_close(target, target.transpose(1, 2))
        torch.testing.assert_close(torch.diagonal(target, dim1=1, dim2=2), torch.ones(4, rois))
        torch.testing.assert_close(target[0, 0, 1], torch.corrcoef(x[0, :2])[0, 1])
        torch.testing.assert_close(torch.diagonal(out.recon, dim1=1, dim2=2), torch.ones(4, rois))  # a correlation matrix
    x = torch.randn(2, 5, 20)
    m.eval()
    x2 = x[:, [1, 0, 2, 3, 4]]  # the spatial projections know which ROI is which
    assert not torch.equal(m.tokenize_with_features(x)[1], m.tokenize_with_features(x2)[1])
    with pytest.raises(ValueError, match="spectrum_weight"):
        FMRITokenizer(TokenizerConfig(layout="connectivity", patch=20, spectrum_weight=1.0))


def coupling_windows(sign: float, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` windows ``[n, 6 rois, 24]`` whose ROIs 0 and 1 move together (``sign`` 1) or apart (-1)."""
    common = torch.randn(n, 1, 24, generator=g)
    x = torch.randn(n, 6, 24, generator=g)
    x[:, :2] = torch.cat([common, sign * common], 1) + 0.3 * torch.randn(n, 2, 24, generator=g)
    return x


def test_connectivity_codes_name_the_coupling_not_the_waveform():
    """Windows of two groups that differ only in whether ROIs 0 and 1 move together or apart:
    after a little training their codes differ, and the correlation rebuilt from the codes alone
    has each group's sign for that pair."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)

    def windows(sign, n=64):
        return coupling_windows(sign, n, g)

    m = FMRITokenizer(TokenizerConfig(layout="connectivity", patch=24, width=32, heads=2, depth=1, code_dim=8, num_codes=8))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(150):
        x = torch.cat([windows(1.0), windows(-1.0)])
        out = m(x)
        loss = F.mse_loss(out.recon, m.target(x)) + out.quant.commitment_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    together, apart = m.tokenize(windows(1.0)).flatten(), m.tokenize(windows(-1.0)).flatten()
    assert not set(together.tolist()) & set(apart.tolist())
    assert m.decode(together[:8, None, None], 6)[:, 0, 1].min() > 0.5
    assert m.decode(apart[:8, None, None], 6)[:, 0, 1].max() < -0.5


def test_a_centered_quantizer_codes_deviations_from_the_mean_of_its_first_vectors():
    """Vectors that share a large common part: centred, the k-means initialisation (from
    ``init_vectors``, not the first batch) tells the two deviations apart; uncentred every vector
    points the same way."""
    torch.manual_seed(0)
    common, dev = torch.tensor([10.0, 0, 0, 0]), torch.tensor([0, 1.0, -1.0, 0])
    batch = lambda: torch.cat([common + dev + 0.05 * torch.randn(8, 4), common - dev + 0.05 * torch.randn(8, 4)])  # noqa: E731
    vq = VectorQuantizer(2, 4, init_vectors=32, centered=True).train()
    vq(batch())
    assert not bool(vq.initialized)  # 16 of 32 vectors held
    vq(batch())
    assert bool(vq.initialized)
    torch.testing.assert_close(vq.center, common, atol=0.05, rtol=0)
    assert vq.scale.item() == pytest.approx(dev.norm().item(), rel=0.05)
    codes = vq.eval()(batch()).codes
    assert set(codes[:8].tolist()).isdisjoint(codes[8:].tolist())
    torch.testing.assert_close(vq.directions(vq.center[None] + dev), F.normalize(dev[None], dim=-1))
    assert {"center", "scale"} <= set(vq.state_dict()) and not {"center", "scale"} & set(VectorQuantizer(2, 4).state_dict())  # older checkpoints load


def test_the_fc_encoder_codes_a_window_by_its_correlations_and_learns_only_a_length_per_code():
    """``encoder="fc"``: the code vector is the window's correlation triangle; windows whose ROIs 0
    and 1 move together or apart fall on different codes, and the correlation rebuilt from a
    code alone has its group's sign."""
    g = torch.Generator().manual_seed(1)

    def windows(sign, n=64):
        return coupling_windows(sign, n, g)

    m = FMRITokenizer(TokenizerConfig(layout="connectivity", encoder="fc", rois=6, patch=24, num_codes=8)).train()
    assert [n for n, _ in m.named_parameters()] == ["log_length"]
    for _ in range(2):  # the k-means initialisation waits for 16 x 8 windows
        out = m(torch.cat([windows(1.0), windows(-1.0)]))
    assert bool(m.quantizer.initialized) and out.codes.shape == (128, 1, 1) and out.recon.shape == (128, 6, 6)
    x = windows(1.0, 4)
    i, j = torch.triu_indices(6, 6, 1)
    torch.testing.assert_close(m.encode(x)[:, 0], m.target(x)[:, i, j])
    m.eval()
    together, apart = m.tokenize(windows(1.0)).flatten(), m.tokenize(windows(-1.0)).flatten()
    assert not set(together.tolist()) & set(apart.tolist())
    rebuilt = m.decode(together[:8, None, None], 6)
    torch.testing.assert_close(torch.diagonal(rebuilt, dim1=1, dim2=2), torch.ones(8, 6))
    assert rebuilt[:, 0, 1].min() > 0.5 and m.decode(apart[:8, None, None], 6)[:, 0, 1].max() < -0.5
    with pytest.raises(ValueError, match="6 ROIs"):
        m.tokenize(torch.randn(2, 5, 24))
    with pytest.raises(ValueError, match="layout 'connectivity'"):
        FMRITokenizer(TokenizerConfig(layout="state", encoder="fc", rois=6))
    with pytest.raises(ValueError, match="model.rois"):
        FMRITokenizer(TokenizerConfig(layout="connectivity", encoder="fc", patch=24))


def test_decode_rebuilds_the_forward_pass_from_codes_alone():
    torch.manual_seed(0)
    for layout, patch in (("roi", 4), ("state", 4), ("connectivity", 16)):
        m = FMRITokenizer(TokenizerConfig(layout=layout, patch=patch, width=16, heads=2, depth=1, code_dim=8, num_codes=16)).eval()
        x = torch.randn(3, 6, 16)
        out = m(x)
        torch.testing.assert_close(m.decode(out.codes, rois=6), out.recon)
        with pytest.raises(ValueError, match="code channels"):
            m.decode(out.codes[:, :1].repeat(1, 2, 1), rois=6)


def test_tiny_tokenizer_overfits_a_handful_of_windows():
    torch.manual_seed(0)
    t = torch.linspace(0, 6.28, 32)
    x = torch.stack([torch.stack([torch.sin(t * (1 + r) + w) for r in range(4)]) for w in range(4)])  # [4, 4, 32]
    m = FMRITokenizer(TokenizerConfig(patch=8, width=32, heads=2, depth=1, code_dim=16, num_codes=64, beta=0.25))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(400):
        out = m(x)
        loss = F.mse_loss(out.recon, x) + out.quant.commitment_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    r2 = r2_per_roi(x, m(x).recon).mean().item()
    assert r2 > 0.9


def test_nonsaturating_adversary_trains_the_classifier_and_fools_it_from_the_fmri_side():
    torch.manual_seed(5)
    head = AlignmentHead(8, 6, AlignmentConfig(tokens_per_step=16, adversary="nonsaturating"))
    feats = torch.randn(2, 8, 8, requires_grad=True)
    text = torch.randn(20, 6)
    loss, acc = head.domain_loss(feats, text, coef=0.0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert feats.grad is None or feats.grad.abs().sum() == 0  # coef 0: only the classifier learns
    assert head.classifier[0].weight.grad.abs().sum() > 0
    head.zero_grad()
    loss, _ = head.domain_loss(feats, text, coef=1.0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    g_classifier = head.classifier[0].weight.grad.clone()
    # the fMRI side descends "called text": a small step along -grad lowers the fMRI logit margin
    with torch.no_grad():
        before = head.classifier(head.project(feats.reshape(-1, 8)))
        after = head.classifier(head.project((feats - 0.1 * feats.grad).reshape(-1, 8)))
    assert (after[:, 0] - after[:, 1]).mean() > (before[:, 0] - before[:, 1]).mean()
    # the classifier's gradient is the same as without the fooling term (its weights are not pushed to be fooled)
    head.zero_grad()
    head.domain_loss(feats, text, coef=0.0, generator=torch.Generator().manual_seed(0))[0].backward()
    torch.testing.assert_close(head.classifier[0].weight.grad, g_classifier)
