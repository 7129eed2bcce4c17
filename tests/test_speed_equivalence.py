"""The fast paths of issue 17 give the outputs of the straightforward formulations they replace (kept here as the
references): the vectorised box gather, COAP's sparse part encoding (occupancy, collision loss and its gradient, RNG
use), the guided sampling chain, and pose-only denoising steps with one final decode."""
from __future__ import annotations

import os

import pytest
import torch

from configs import prohmr_config
from egohmr import collision
from egohmr.coap import load_coap_checkpoint
from egohmr.coap.sampling import draw_face_samples, face_areas, points_on_drawn_faces, sample_points_on_faces
from egohmr.model import POSE_ONLY_KEY, EgoHMR
from utils.geometry import rot6d_to_rotmat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COAP_WEIGHTS = os.path.join(ROOT, 'tests', 'assets', 'coap_synthetic_neutral.ckpt')
BODIES = 3


@pytest.fixture(scope='module')
def model(body_model_dir):
    torch.manual_seed(0)
    model = EgoHMR(prohmr_config(), data_dir=body_model_dir, pelvis_vis_loosen=True, diffuse_fuse=True,
                   with_coap=True).eval()
    load_coap_checkpoint(model.coap, COAP_WEIGHTS)
    return model


def reference_gather_box_points(scene_points, vertices, max_point_index=None):
    """The per-body loop that ``collision.gather_box_points`` replaced."""
    masks = [collision.box_mask_with_cap(scene_points[i], vertices[i], max_point_index)
             for i in range(scene_points.shape[0])]
    counts = [int(m.sum()) for m in masks]
    padded = scene_points.new_full((scene_points.shape[0], max(counts + [0]), 3), collision.FAR_POINT)
    for i, mask in enumerate(masks):
        padded[i, :counts[i]] = scene_points[i][mask]
    return padded, counts


def posed_body(model, seed=0, requires_grad=False):
    """Neutral bodies near the mean pose; returns (pose_6d, body) with the pose a leaf if ``requires_grad``."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(BODIES, 144, generator=g)
    pose_6d = model.denormalize_pose(x)
    if requires_grad:
        pose_6d.requires_grad_(True)
    rotmats = rot6d_to_rotmat(pose_6d, mode='diffusion').reshape(BODIES, 24, 3, 3)
    out = model.smpl(global_orient=rotmats[:, :1], body_pose=rotmats[:, 1:], betas=torch.zeros(BODIES, 10),
                     pose2rot=False)
    return pose_6d, collision.body_for_occupancy(out.vertices, out.joints, rotmats)


def scene_around(body, seed=1, count=3000):
    """Points uniform in each body's box grown by 10 %, some beyond it; body 2 gets none in its box."""
    g = torch.Generator().manual_seed(seed)
    verts = body.vertices.detach()
    lo, hi = verts.min(dim=1).values[:, None], verts.max(dim=1).values[:, None]
    pad = 0.1 * (hi - lo)
    scene = lo - pad + (hi - lo + 2 * pad) * torch.rand(BODIES, count, 3, generator=g)
    scene[2] += 50.0
    return scene


def test_vectorised_box_gather_equals_the_per_body_loop(model):
    _, body = posed_body(model)
    scene = scene_around(body)
    for cap in (None, 2000, 10 ** 6):
        padded, counts = collision.gather_box_points(scene, body.vertices, cap)
        expected, expected_counts = reference_gather_box_points(scene, body.vertices, cap)
        assert counts == expected_counts and torch.equal(padded, expected)
        for i in range(BODIES):                                  # each body alone: its own rows
            single, single_count = collision.gather_box_points(scene[i:i + 1], body.vertices[i:i + 1], cap)
            assert single_count == [counts[i]] and torch.equal(single[0], padded[i, :counts[i]])
    assert counts[2] == 0 and min(counts[:2]) > 1000


def test_drawn_face_samples_equal_sample_points_on_faces(model):
    _, body = posed_body(model)
    faces = model.coap.partitioner.extended_face_tensor
    torch.manual_seed(5)
    expected = sample_points_on_faces(body.vertices, faces, 40)
    after = torch.rand(1)
    torch.manual_seed(5)
    chosen, weights = draw_face_samples(body.vertices, faces, 40)
    assert torch.equal(torch.rand(1), after)                     # same RNG use
    b_idx, k_idx = torch.meshgrid(torch.arange(BODIES), torch.arange(faces.shape[0]), indexing='ij')
    points = points_on_drawn_faces(body.vertices, faces, chosen, weights, b_idx.reshape(-1), k_idx.reshape(-1))
    assert torch.equal(points.reshape(expected.shape), expected)
    one = points_on_drawn_faces(body.vertices, faces, chosen, weights, torch.tensor([1]), torch.tensor([7]))
    assert torch.equal(one[0], expected[1, 7])                   # one pair alone


def test_face_set_areas_equal_each_sets_face_areas(model):
    """Each distinct face's area computed once (draw_surface_samples) is the per-set computation bit for bit, so the
    multinomial face draws see the same weights; the index follows the tables when they are written to."""
    _, body = posed_body(model)
    partitioner = model.coap.partitioner
    tables = (partitioner.tight_face_tensor, partitioner.extended_face_tensor)
    index = partitioner.face_set_index()
    assert index.faces.shape[0] < sum(t.shape[0] * t.shape[1] for t in tables) // 2     # repeated faces, counted once
    for vertices in (body.vertices, 10.0 * body.vertices.double()):
        for got, faces in zip(index.areas(vertices), tables):
            expected = face_areas(vertices, faces)
            assert got.dtype == expected.dtype and torch.equal(got, expected)
            assert bool((got[:, faces[..., 0] < 0] == 0).all()) and bool((got[:, faces[..., 0] >= 0] > 0).all())
    assert partitioner.face_set_index() is index                                     # cached
    saved = partitioner.tight_face_tensor.clone()
    try:
        with torch.no_grad():
            partitioner.tight_face_tensor[0, 0] = partitioner.tight_face_tensor[1, 0]
        rebuilt = partitioner.face_set_index()
        assert rebuilt is not index
        assert torch.equal(rebuilt.areas(body.vertices)[0], face_areas(body.vertices, partitioner.tight_face_tensor))
    finally:
        with torch.no_grad():
            partitioner.tight_face_tensor.copy_(saved)


def test_encode_parts_equals_encode_body_rows(model):
    coap = model.coap
    _, body = posed_body(model)
    torch.manual_seed(6)
    with torch.no_grad():
        code = coap.encode_body(body)
    coap.detach_cache()
    torch.manual_seed(6)
    draws = coap.draw_surface_samples(body.vertices)
    b_idx, k_idx = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 9, 3, 15, 4])
    with torch.no_grad():
        latent = coap.encode_parts(body.vertices, code['bone_trans'], draws, b_idx, k_idx)
        assert torch.equal(latent, code['latent_code'][b_idx, k_idx])
        for j in range(b_idx.shape[0]):                          # each pair alone equals its row of the batch
            single = coap.encode_parts(body.vertices, code['bone_trans'], draws, b_idx[j:j + 1], k_idx[j:j + 1])
            assert torch.equal(single[0], latent[j])


def dense_and_sparse(model, fn_dense, fn_sparse, seed=7):
    """Run both with the same seed from a cold body-code cache; return results and the next random number."""
    results = []
    for fn in (fn_dense, fn_sparse):
        model.coap.detach_cache()
        torch.manual_seed(seed)
        value = fn()
        results.append((value, torch.rand(1)))
    model.coap.detach_cache()
    return results


def test_sparse_query_equals_the_dense_query(model):
    coap = model.coap
    _, body = posed_body(model)
    points, _ = collision.gather_box_points(scene_around(body), body.vertices)
    with torch.no_grad():
        (dense, rng_dense), (sparse, rng_sparse) = dense_and_sparse(
            model, lambda: coap.query(points, body), lambda: coap.sparse_query(points, body)[0])
    assert torch.equal(sparse, dense) and torch.equal(rng_dense, rng_sparse)
    assert (dense[:2] > 0.5).sum() > 10 and not dense[2].any()


def test_sparse_collision_loss_value_and_gradient_equal_the_dense_ones(model):
    coap = model.coap

    def loss_and_grad(sparse):
        pose_6d, body = posed_body(model, requires_grad=True)
        points, _ = collision.gather_box_points(scene_around(body), body.vertices)
        loss = (coap.sparse_collision_loss if sparse else coap.collision_loss)(points, body)
        return loss.detach(), torch.autograd.grad(loss.sum(), pose_6d)[0]

    (dense, rng_dense), (sparse, rng_sparse) = dense_and_sparse(model, lambda: loss_and_grad(False),
                                                                lambda: loss_and_grad(True))
    assert torch.equal(sparse[0], dense[0]) and torch.equal(rng_dense, rng_sparse)
    assert dense[0][0] > 0 and dense[1].abs().max() > 0
    scale = dense[1].abs().max()
    torch.testing.assert_close(sparse[1] / scale, dense[1] / scale, rtol=0, atol=1e-4)     # float rounding


def test_sparse_collision_gradient_is_the_dense_one_in_fp64(model):
    """In fp64 the sparse gradient (colliding points only; the part encoder's backward on its surface samples at a
    maximum, as marked by the no-gradient encoding) is the dense one to 1e-9: the difference is float rounding."""
    import copy
    m = copy.deepcopy(model).double()
    coap = m.coap

    def loss_and_grad(sparse):
        g = torch.Generator().manual_seed(0)
        pose_6d = m.denormalize_pose(0.3 * torch.randn(BODIES, 144, generator=g, dtype=torch.float64))
        pose_6d.requires_grad_(True)
        rotmats = rot6d_to_rotmat(pose_6d, mode='diffusion').reshape(BODIES, 24, 3, 3)
        out = m.smpl(global_orient=rotmats[:, :1], body_pose=rotmats[:, 1:],
                     betas=torch.zeros(BODIES, 10, dtype=torch.float64), pose2rot=False)
        body = collision.body_for_occupancy(out.vertices, out.joints, rotmats)
        points, _ = collision.gather_box_points(scene_around(body), body.vertices)
        torch.manual_seed(4)
        coap.detach_cache()
        coap.encoder.max_rows_backward = sparse            # dense: autograd through the whole encoder
        loss = (coap.sparse_collision_loss if sparse else coap.collision_loss)(points, body)
        return loss.detach(), torch.autograd.grad(loss.sum(), pose_6d)[0]

    dense, sparse = loss_and_grad(False), loss_and_grad(True)
    assert coap.encoder.max_rows_backward and model.coap.encoder.max_rows_backward
    assert dense[1].dtype == torch.float64 and dense[1].abs().max() > 0
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(sparse[1], dense[1], rtol=0, atol=1e-9 * dense[1].abs().max().item())


def guidance_batch(model, bs=2, num_points=4000, seed=3):
    g = torch.Generator().manual_seed(seed)
    conf = (torch.rand(bs, 25, 1, generator=g) > 0.4).float()
    _, body = posed_body(model, seed=seed)
    scene = scene_around(body, seed=seed, count=num_points)[:bs] + torch.tensor([0.0, 0.1, 3.0])
    return {
        'img': torch.randn(bs, 3, 224, 224, generator=g),
        'orig_keypoints_2d': torch.cat([torch.rand(bs, 25, 2, generator=g) - 0.5, conf], dim=-1),
        'fx': torch.full((bs,), 1.0), 'box_center': 300 + 500 * torch.rand(bs, 2, generator=g),
        'box_size': torch.full((bs,), 400.0), 'cam_cx': torch.full((bs,), 955.0),
        'cam_cy': torch.full((bs,), 530.0), 'scene_pcd_verts_full': scene,
        'smpl_params': {'transl': torch.tensor([[0.0, 0.1, 3.0]]).repeat(bs, 1)},
    }


def test_guidance_gradients_along_a_guided_chain_equal_the_dense_reference(model, monkeypatch):
    """Every guided step of a ddpm-6 chain (w = 2, guidance on all steps): the sparse gradient at the step's input
    equals the dense one up to float rounding, and the collision ratio of the result is the same.

    (Whole guided chains are not compared: with random weights a chain amplifies any rounding change of a gradient,
    ~1e-6 relative, by ~30x per step, and the dense path itself would do the same under any other rounding.)"""
    from diffusion import create_gaussian_diffusion
    from egohmr.evaluate import sample_poses
    from egohmr.guidance import CollisionGuidance

    class Recording(CollisionGuidance):
        def gradient(self, x, model_output, batch, step=0):
            states.append((x.clone(), model_output, batch, step))
            return super().gradient(x, model_output, batch, step)

    states = []
    guidance = Recording(model, model.coap, weight=2.0)
    torch.manual_seed(11)
    samples = sample_poses(model, create_gaussian_diffusion(6, ''), guidance_batch(model), 2, 'ddpm',
                           guidance=guidance)
    plain = CollisionGuidance(model, model.coap, weight=2.0)
    compared = 0
    for x, model_output, batch, step in states:
        sparse = plain.gradient(x, model_output, batch, step)
        monkeypatch.setattr(collision, '_uses_sparse_path', lambda occupancy_model, body: False)
        dense = plain.gradient(x, model_output, batch, step)
        monkeypatch.undo()
        assert (sparse is None) == (dense is None)
        if dense is not None:
            scale = dense.abs().max()
            torch.testing.assert_close(sparse / scale, dense / scale, rtol=0, atol=1e-4)   # float rounding
            compared += 1
    assert compared >= 5
    scene = states[0][1]['condition']['scene_points']
    flat = {k: samples[k].transpose(0, 1).reshape(-1, *samples[k].shape[2:]) for k in ('vertices', 'joints', 'rotmats')}
    ratios = []
    for sparse in (True, False):
        if not sparse:
            monkeypatch.setattr(collision, '_uses_sparse_path', lambda occupancy_model, body: False)
        model.coap.detach_cache()
        ratios.append(collision.collision_ratio(model.coap, scene, flat['vertices'], flat['joints'], flat['rotmats']))
        monkeypatch.undo()
    assert (ratios[0] == ratios[1]).all()


def test_pose_only_steps_give_the_fully_decoded_chain(model):
    """sample_poses (pose-only steps, one decode) against the chain that decodes every step, same seed."""
    from diffusion import create_gaussian_diffusion
    from egohmr.evaluate import sample_poses, sampling_batch, untile

    batch = guidance_batch(model, seed=4)
    diffusion = create_gaussian_diffusion(50, 'ddim5')
    torch.manual_seed(12)
    fast = sample_poses(model, diffusion, batch, 3, 'ddim')
    torch.manual_seed(12)
    with torch.no_grad():
        condition = model.sampling_condition(batch)
        chain = sampling_batch(batch, condition, 3)
        chain[POSE_ONLY_KEY] = False
        out = diffusion.sample(model.denoise, (6, 144), method='ddim', model_kwargs={'batch': chain})['model_output']
    for key, ref in (('rotmats', out['pred_rotmats']), ('betas', out['pred_smpl_params']['betas']),
                     ('joints', out['pred_keypoints_3d']), ('vertices', out['pred_vertices'])):
        assert torch.equal(fast[key], untile(ref, 3)), key


# ------------------------------------------------------------------------------------------ cache-sized row chunks
def test_map_row_chunks_covers_every_row_once():
    from utils.tensors import map_row_chunks
    x, y = torch.arange(10.0)[:, None], torch.arange(10.0, 20.0)[:, None]
    seen = []

    def fn(a, b):
        seen.append(a.shape[0])
        return a * b

    assert torch.equal(map_row_chunks(fn, (x, y), 4), x * y) and seen == [4, 4, 2]
    seen.clear()
    assert torch.equal(map_row_chunks(fn, (x, y), 10), x * y) and seen == [10]
    with pytest.raises(ValueError, match='rows_per_chunk'):
        map_row_chunks(fn, (x, y), 0)
    pair = map_row_chunks(lambda a: (a + 1, a > 4), (x,), 3)      # tuple results: each part concatenated
    assert torch.equal(pair[0], x + 1) and torch.equal(pair[1], x > 4)


def test_fp32_under_autocast_casts_tensor_and_dict_arguments():
    from utils.tensors import fp32_under_autocast

    @fp32_under_autocast
    def product(a, extra, scale=1.0):
        return (a @ a.t()) * extra['b'] * scale, extra['n'], torch.is_autocast_enabled('cpu')

    a = torch.randn(3, 4).bfloat16()
    extra = {'b': torch.tensor(2.0).bfloat16(), 'n': torch.tensor([1, 2])}
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, ints, on = product(a, extra)
        assert torch.is_autocast_enabled('cpu')                  # back on after the call
    assert out.dtype == torch.float32 and not on and ints.dtype == torch.int64
    assert torch.equal(out, (a.float() @ a.float().t()) * 2.0)
    out, _, on = product(a, extra)                               # no autocast: called as it is
    assert out.dtype == torch.bfloat16 and not on


def test_chunked_coap_networks_equal_the_whole_batch(model, monkeypatch):
    """COAP's part encoder and query MLPs, a few thousand points at a time: the same bits as one call on every row
    (values and the gradients w.r.t. the inputs), at COAP's own sizes (1000 surface samples a part)."""
    from egohmr.coap import model as coap_model
    coap = model.coap
    g = torch.Generator().manual_seed(21)
    surfaces = torch.randn(9, 1000, 3, generator=g).mul_(0.1).requires_grad_(True)   # 9 parts: slices of 4, 4, 1
    local = torch.randn(5000, 3, generator=g).mul_(0.1).requires_grad_(True)
    parts = torch.randint(0, 16, (5000,), generator=g)
    latent = torch.randn(5000, 128, generator=g)

    def run():
        pooled = coap.encoder.pooled_features(surfaces)
        logits = coap._part_logits(local, parts, latent)
        return (pooled, logits) + torch.autograd.grad(pooled.sum() + logits.sum(), (surfaces, local))

    assert coap.encoder.chunk_points == coap_model.ENCODER_CHUNK_POINTS < 9000
    chunked = run()
    monkeypatch.setattr(coap.encoder, 'chunk_points', None)
    monkeypatch.setattr(coap_model, 'DECODER_CHUNK_POINTS', 10 ** 6)
    whole = run()
    for a, b in zip(chunked, whole):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ --precision bf16
def test_bf16_keeps_smpl_geometry_and_graph_mixing_in_fp32(model):
    """Under bf16 autocast: decoding to SMPL, COAP's bone frames and point transforms give the fp32 bits; the GCN's
    graph mixing and output layer run in fp32 (fp32 outputs), and casting W once per chain changes nothing."""
    from egohmr.coap.model import apply_transform
    from egohmr.gcn import weights_cast_once

    batch = guidance_batch(model, seed=5)
    g = torch.Generator().manual_seed(22)
    x = torch.randn(2, 144, generator=g)
    with torch.no_grad():
        cond = model.sampling_condition(batch)
        fp32 = model.decode(x, cond, batch)
        _, body = posed_body(model)
        bone_trans = model.coap.compute_bone_trans(body.full_pose, body.joints)
        points = torch.randn(3, 50, 3, generator=g)
        moved = apply_transform(bone_trans[:, :1], points[:, None])
        h = torch.randn(4, 24, 1024, generator=g)
        gcn_layers = model.diffusion_model.gconv_layers[0].gconv1.gconv
        with torch.autocast('cpu', dtype=torch.bfloat16):
            bf16 = model.decode(x, cond, batch)
            assert torch.equal(model.coap.compute_bone_trans(body.full_pose, body.joints), bone_trans)
            assert torch.equal(apply_transform(bone_trans[:, :1], points[:, None]), moved)
            y = torch.randn(4, 24, 1024, generator=g)
            mixed = gcn_layers.mix(y, 2 * y)
            assert mixed.dtype == torch.float32
            out = model.diffusion_model.gconv_output(h)
            assert out.dtype == torch.float32
            plain = gcn_layers(h)
            with weights_cast_once(model):
                assert torch.equal(gcn_layers(h), plain) and gcn_layers._cast_cache
            assert gcn_layers._cast_cache is None
        assert torch.equal(mixed, gcn_layers.mix(y, 2 * y))
    for key in ('pred_vertices', 'pred_keypoints_3d', 'pred_rotmats', 'pred_keypoints_2d_full'):
        assert bf16[key].dtype == torch.float32 and torch.equal(bf16[key], fp32[key]), key


def test_bf16_guided_sampling_moves_joints_by_far_less_than_half_a_millimetre(model):
    """A guided ddpm-5 chain (COAP's networks and the GCN in bf16, the rest fp32) against fp32, same seed."""
    from diffusion import create_gaussian_diffusion
    from egohmr.evaluate import sample_poses
    from egohmr.guidance import CollisionGuidance

    batch = guidance_batch(model, seed=6)
    guidance = CollisionGuidance(model, model.coap, weight=2.0)
    runs = {}
    for precision in ('fp32', 'bf16'):
        torch.manual_seed(13)
        runs[precision] = sample_poses(model, create_gaussian_diffusion(5, ''), batch, 1, 'ddpm', guidance=guidance,
                                       occupancy_model=model.coap, precision=precision)
    joints = {k: v['joints'][:, :, :24] - v['joints'][:, :, :1] for k, v in runs.items()}
    change_mm = 1000 * float((joints['fp32'] - joints['bf16']).norm(dim=-1).mean())
    assert runs['bf16']['joints'].dtype == torch.float32 and runs['fp32']['collision_ratio'].min() > 0
    assert 0 < change_mm < 0.5
    assert abs(runs['fp32']['collision_ratio'] - runs['bf16']['collision_ratio']).max() <= 0.05 * max(
        runs['fp32']['collision_ratio'].max(), 1e-3)


def test_bf16_softplus_clamps_only_the_negligible_tail(model):
    """COAP's Softplus(beta=100) under autocast: fp32, equal to Softplus wherever beta*x >= -15, and within 3.1e-9
    below (where it clamps); outside autocast it is Softplus itself."""
    net = model.coap.decoder
    x = torch.linspace(-1.0, 0.5, 200001)
    exact = net.activation(x)
    assert torch.equal(net.activate(x), exact)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        fast = net.activate(x)
    keep = 100.0 * x >= -15.0
    assert fast.dtype == torch.float32 and torch.equal(fast[keep], exact[keep]) and (~keep).sum() > 1000
    assert float((fast - exact).abs().max()) <= 3.1e-9
