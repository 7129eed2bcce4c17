"""Stage-2 EgoHMR denoiser: state_dict vs the manifest, graph convolution, visibility, condition masking,
diffuse_fuse, statistics round trip, forward shapes, losses, collision glue and cached-condition sampling."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from configs import prohmr_config
from egohmr import collision
from egohmr.embeddings import sinusoidal_table
from egohmr.gcn import ModulatedGCN, ModulatedGraphConv, smpl_adjacency
from egohmr.losses import keypoint_2d_loss, keypoint_3d_loss, pose_6d_ortho_loss
from egohmr.model import EgoHMR, coap_available
from egohmr.visibility import in_image_mask, smpl_joint_visibility
from utils.body_model import SMPL_EDGES
from utils.geometry import aa_to_rotmat

SPEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets', 'manifests')
MANIFEST = os.path.join(SPEC, 'stage2_egohmr.tsv')
FORWARD_IO = os.path.join(SPEC, 'stage2_forward_io.json')
COAP_TABLES = ('smpl.coap.partitioner.tight_face_tensor', 'smpl.coap.partitioner.extended_face_tensor',
               'smpl.coap.partitioner.tight_vert_selector')
NUM_SCENE_POINTS = 500   # the manifest's 20000 is a data choice; any P works


@pytest.fixture(scope='module')
def data_dir(body_model_dir):
    """The session's synthetic body-model folder."""
    return body_model_dir


@pytest.fixture(scope='module')
def model(data_dir):
    torch.manual_seed(0)
    return EgoHMR(prohmr_config(), data_dir=data_dir, pelvis_vis_loosen=True).eval()


def random_batch(bs=2, num_points=NUM_SCENE_POINTS, seed=0):
    g = torch.Generator().manual_seed(seed)
    conf = (torch.rand(bs, 25, 1, generator=g) > 0.4).float()
    return {
        'img': torch.randn(bs, 3, 224, 224, generator=g),
        'orig_keypoints_2d': torch.cat([torch.rand(bs, 25, 2, generator=g) - 0.5, conf], dim=-1),
        'fx': torch.full((bs,), 1.0) + 0.1 * torch.rand(bs, generator=g),
        'box_center': 300 + 500 * torch.rand(bs, 2, generator=g),
        'box_size': torch.full((bs,), 400.0),
        'cam_cx': torch.full((bs,), 955.0), 'cam_cy': torch.full((bs,), 530.0),
        'scene_pcd_verts_full': torch.randn(bs, num_points, 3, generator=g) * 0.7 + torch.tensor([0.0, 0.0, 3.0]),
        'smpl_params': {'transl': torch.tensor([[0.0, 0.1, 3.0]]).repeat(bs, 1) + 0.1 * torch.rand(bs, 3, generator=g)},
        'x_t': torch.randn(bs, 144, generator=g),
    }


def read_manifest(path):
    rows = [line.rstrip('\n').split('\t') for line in open(path) if not line.startswith('#')]
    return [(key, tuple(int(v) for v in shape.split(',')) if shape else ()) for key, shape, _, _ in rows]


# ------------------------------------------------------------------------------------------------ structure
def test_state_dict_matches_manifest(model):
    manifest = read_manifest(MANIFEST)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    if not coap_available():
        manifest = [(k, s) for k, s in manifest if not k.startswith('smpl.coap.')]
    assert [k for k, _ in ours] == [k for k, _ in manifest]
    for (key, shape), (_, expected) in zip(ours, manifest):
        if key in COAP_TABLES:   # sizes depend on the body mesh; the part and coordinate axes are structural
            assert shape[0] == expected[0] and len(shape) == len(expected) and shape[2:] == expected[2:]
        else:
            assert shape == expected, key
    params = sum(p.numel() for p in model.parameters())
    assert params == (53760969 if coap_available() else 53760969 - 840170)
    assert sum(p.numel() for p in model.trainable_parameters()) == 52920544


def test_adjacency_matches_original():
    adj = smpl_adjacency()
    assert torch.all(adj.diagonal() == 1)
    np.testing.assert_allclose(adj[0, [1, 2, 3]], [1 / 3] * 3)
    np.testing.assert_allclose(adj[9, [6, 12, 13, 14]], [1 / 4] * 4)
    assert not torch.equal(adj, adj.t())
    degree = {j: sum(j in e for e in SMPL_EDGES) for j in range(24)}
    for i in range(24):
        for j in range(24):
            edge = (i, j) in SMPL_EDGES or (j, i) in SMPL_EDGES
            expected = 1.0 if i == j else (1.0 / degree[i] if edge else 0.0)
            assert adj[i, j].item() == pytest.approx(expected)
    conv = ModulatedGraphConv(4, 3, adj)
    assert 'adj' not in conv.state_dict() and torch.equal(conv.adj, adj)


def test_modulated_graph_conv_formula():
    torch.manual_seed(1)
    conv = ModulatedGraphConv(5, 4, smpl_adjacency())
    with torch.no_grad():
        conv.adj2.normal_()
    x = torch.randn(2, 24, 5)
    a = conv.adj + conv.adj2
    a = (a + a.t()) / 2
    expected = torch.zeros(2, 24, 4)
    for i in range(24):
        expected[:, i] += a[i, i] * conv.M[i] * (x[:, i] @ conv.W[0])
        for j in range(24):
            if j != i:
                expected[:, i] += a[i, j] * conv.M[j] * (x[:, j] @ conv.W[1])
    torch.testing.assert_close(conv(x), expected + conv.bias, rtol=1e-4, atol=1e-5)


def brute_force_graph_conv(conv, x):
    """The layer's formula joint by joint and sample by sample, in the dtype of ``x``."""
    a = conv.adj.to(x.dtype) + conv.adj2
    a = (a + a.t()) / 2
    rows = []
    for b in range(x.shape[0]):
        joints = []
        for i in range(24):
            total = conv.bias.clone()
            for j in range(24):
                weight = conv.W[0] if i == j else conv.W[1]
                total = total + a[i, j] * conv.M[j] * (x[b, j] @ weight)
            joints.append(total)
        rows.append(torch.stack(joints))
    return torch.stack(rows)


def test_graph_conv_values_and_gradients_equal_the_per_joint_formula():
    torch.manual_seed(4)
    conv = ModulatedGraphConv(6, 5, smpl_adjacency())
    assert list(conv.state_dict()) == ['W', 'M', 'adj2', 'bias']
    with torch.no_grad():
        conv.adj2.normal_(0.0, 0.3)
        conv.bias.normal_()
    x = torch.randn(3, 24, 6)
    # fp32 against the formula in fp64: float rounding only.
    exact = brute_force_graph_conv(conv.double(), x.double()).float()
    conv.float()
    out = conv(x)
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-6 * exact.abs().max().item())
    # fp64: values and the gradients of every parameter and of the input.
    conv.double()
    x64 = x.double().requires_grad_()
    weights = torch.randn(3, 24, 5, dtype=torch.float64)
    (conv(x64) * weights).sum().backward()
    fast = [x64.grad] + [p.grad.clone() for p in conv.parameters()]
    conv.zero_grad()
    x64.grad = None
    (brute_force_graph_conv(conv, x64) * weights).sum().backward()
    slow = [x64.grad] + [p.grad for p in conv.parameters()]
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_graph_conv_projection_and_self_term():
    torch.manual_seed(5)
    conv = ModulatedGraphConv(7, 4, smpl_adjacency())
    with torch.no_grad():
        conv.adj2.normal_(0.0, 0.3)
    x = torch.randn(2, 24, 7)
    pair = conv.project_pair(x[..., 2:6], 2, 6)   # x holds the input channels 2:6
    assert pair.shape == (2, 2, 24, 4)
    for b in range(2):
        for j in range(24):
            for k in range(2):
                expected = sum(x[b, j, 2 + c] * conv.W[k, 2 + c] for c in range(4))
                torch.testing.assert_close(pair[k, b, j], expected, rtol=1e-6, atol=1e-6)
    h_self, h_neigh = conv.project(x[..., 2:6], 2, 6)
    assert torch.equal(h_self, pair[0]) and torch.equal(h_neigh, pair[1])
    # The self term is diag(A) * y: bit-identical to the (A*I) @ y GEMM it replaces (whose other terms are 0).
    y = torch.randn(3, 24, 4)
    a = conv.effective_adjacency()
    with torch.no_grad():
        mixed = conv.mix(y, torch.zeros_like(y))
    assert torch.equal(mixed, torch.matmul(a * torch.eye(24), y) + conv.bias)


def test_gcn_split_projection_equals_full_input():
    torch.manual_seed(2)
    gcn = ModulatedGCN(in_dim=10, hid_dim=8, out_dim=6, num_layers=2).eval()
    x = torch.randn(3, 24, 10)
    torch.testing.assert_close(gcn(x[..., 7:], gcn.project_leading(x[..., :7])), gcn(x), rtol=1e-5, atol=1e-5)


def test_timestep_table_and_shared_buffer(model):
    table = sinusoidal_table(50, 512)
    p, i = 7, 5
    assert table[p, 2 * i].item() == pytest.approx(np.sin(p * 10000 ** (-2 * i / 512)), abs=1e-5)
    assert table[p, 2 * i + 1].item() == pytest.approx(np.cos(p * 10000 ** (-2 * i / 512)), abs=1e-5)
    sd = model.state_dict()
    assert torch.equal(sd['sequence_pos_encoder.pe'][:50, 0], table)
    assert model.embed_timestep.sequence_pos_encoder is model.sequence_pos_encoder


# ------------------------------------------------------------------------------------------------ visibility
def test_visibility_maps_train_and_test():
    kp = torch.zeros(1, 25, 3)
    kp[0, [9, 12, 0], 2] = 1.0           # hips and nose detected; knees and neck not
    train = smpl_joint_visibility(kp.clone(), pelvis_vis_loosen=False)[0]
    test = smpl_joint_visibility(kp.clone(), pelvis_vis_loosen=True)[0]
    assert train[[0, 3, 6, 9]].all() and test[[0, 3, 6, 9]].all()   # MidHip is forced visible
    assert train[1] and train[2] and not test[1] and not test[2]     # SMPL hips: OP 12/9 vs the knees 13/10
    assert train[12] and not test[12]                                # SMPL neck: OP 0 vs OP 1
    kp[0, [13, 10], 2] = 1.0
    assert smpl_joint_visibility(kp, pelvis_vis_loosen=True)[0, [1, 2, 4, 5]].all()


def test_in_image_mask_bounds():
    f, c = torch.tensor([1000.0]), torch.tensor([[960.0, 540.0]])
    pts = torch.tensor([[[0.0, 0.0, 2.0], [1.92, 0.0, 2.0], [-1.919, 0.0, 2.0], [0.0, 1.08, 2.0], [0.0, -1.08, 2.0]]])
    assert in_image_mask(pts, f, c)[0].tolist() == [True, False, True, False, True]


# ------------------------------------------------------------------------------------------------ conditioning
def test_condition_masking(model):
    cond = torch.rand(4, 24, model.cond_dim) + 0.1
    assert torch.equal(model.mask_cond(cond), cond)                     # eval: no dropout
    forced = model.mask_cond(cond, force_mask=True)
    assert torch.all(forced[..., :2048] == 0) and torch.equal(forced[..., 2048:], cond[..., 2048:])
    saved = (model.training, model.cond_mask_prob, model.only_mask_img_cond)
    try:
        model.training, model.cond_mask_prob = True, 1.0
        assert torch.equal(model.mask_cond(cond), forced)
        model.only_mask_img_cond = False
        assert torch.all(model.mask_cond(cond) == 0)
        model.cond_mask_prob = 0.0
        assert torch.equal(model.mask_cond(cond), cond)
    finally:
        model.training, model.cond_mask_prob, model.only_mask_img_cond = saved


def test_forward_shapes_match_manifest(model):
    spec = json.load(open(FORWARD_IO))
    batch = random_batch(bs=spec['input']['x_t'][0][0])
    with torch.no_grad():
        out = model(batch, torch.tensor([0, 49]))
    for name, (shape, dtype) in spec['output'].items():
        value = out
        for part in name.split('.'):
            value = value[part]
        assert list(value.shape) == shape, name
        assert str(value.dtype) == f'torch.{dtype}', name
    # the original writes vis_mask_smpl into the batch; ours returns it and leaves the batch alone
    assert list(out['vis_mask_smpl'].shape) == spec['input']['vis_mask_smpl'][0]
    assert out['vis_mask_smpl'].dtype == torch.bool
    assert 'vis_mask_smpl' not in batch


def test_diffuse_fuse_takes_visible_joints_from_conditional_pass(model):
    batch = random_batch(seed=3)
    t = torch.tensor([10, 20])
    with torch.no_grad():
        cond = model.encode_condition(batch)
        joint_cond = model.joint_condition(cond)
        x_feat = model.input_process(batch['x_t'].reshape(2, 24, 6))
        t_feat = model.embed_timestep(t)[:, None].expand(-1, 24, -1)
        conditional = model.diffusion_model(torch.cat([joint_cond, x_feat, t_feat], -1)).reshape(2, 144)
        scene_only = model.diffusion_model(torch.cat([model.mask_cond(joint_cond, True), x_feat, t_feat], -1))
        scene_only = scene_only.reshape(2, 144)
        model.diffuse_fuse = True
        try:
            fused = model(dict(batch, condition=cond), t)['pred_x_start']
            fused_cached = model(dict(batch, condition=model.sampling_condition(batch)), t)['pred_x_start']
        finally:
            model.diffuse_fuse = False
        plain = model(dict(batch, condition=cond), t)['pred_x_start']
    vis = cond['vis_mask_smpl'].repeat_interleave(6, dim=1)
    assert vis.any() and (~vis).any()
    torch.testing.assert_close(fused[vis], conditional[vis], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused[~vis], scene_only[~vis], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused_cached, fused, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(plain, conditional, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ body rep
def test_stats_round_trip_and_pose_encoding(model, tmp_path):
    from dataloaders.body_rep_stats import compute_body_rep_stats, load_body_rep_stats, save_body_rep_stats
    rng = np.random.default_rng(0)
    go, pose = rng.normal(0, 0.5, (40, 3)), rng.normal(0, 0.3, (40, 69))
    x_mean, x_std = compute_body_rep_stats(go, pose)
    save_body_rep_stats(str(tmp_path / 'preprocess_stats'), x_mean, x_std)
    loaded_mean, loaded_std = load_body_rep_stats(str(tmp_path))          # a run folder, as at test time
    np.testing.assert_array_equal(loaded_mean, x_mean)
    assert len(np.unique(loaded_std[:6])) == 1 and len(np.unique(loaded_std[6:])) == 1
    original = (model.body_rep_mean.clone(), model.body_rep_std.clone())
    try:
        model.set_body_rep_stats(loaded_mean, loaded_std)
        params = {'global_orient': torch.tensor(go[:3]).float(), 'body_pose': torch.tensor(pose[:3]).float()}
        x = model.x_start_from_smpl_params(params)
        assert abs(float(x.mean())) < 1.0
        rot = aa_to_rotmat(torch.cat([params['global_orient'], params['body_pose']], 1).reshape(3, 24, 3))
        torch.testing.assert_close(model.rotmats_from_x(x), rot, rtol=1e-4, atol=1e-4)
    finally:
        model.set_body_rep_stats(*original)
    assert 'body_rep_mean' not in model.state_dict()


# ------------------------------------------------------------------------------------------------ losses
def test_loss_terms_by_hand():
    pred = torch.zeros(1, 25, 2)
    gt = torch.zeros(1, 25, 3)
    gt[0, :, 0] = 0.1
    gt[0, :, 2] = 2.0
    assert keypoint_2d_loss(pred, gt).item() == pytest.approx(22 * 2.0 * 0.1)   # OpenPose 1, 9, 12 ignored
    p3 = torch.zeros(1, 24, 3)
    g3 = torch.ones(1, 24, 3)
    assert keypoint_3d_loss(p3, g3).item() == pytest.approx(72.0)
    assert keypoint_3d_loss(p3, g3, pelvis_align=True).item() == pytest.approx(0.0)
    rot = aa_to_rotmat(torch.randn(5, 3))
    from utils.geometry import rotmat_to_rot6d
    assert pose_6d_ortho_loss(rotmat_to_rot6d(rot, 'diffusion')).item() == pytest.approx(0.0, abs=1e-10)
    assert pose_6d_ortho_loss(2 * rotmat_to_rot6d(rot, 'diffusion')).item() == pytest.approx(4.5)


def batch_with_gt(seed, bs=2):
    """:func:`random_batch` with the GT fields the losses read (GT joints, gender, axis-angle SMPL parameters)."""
    batch = random_batch(bs=bs, seed=seed)
    batch.update(keypoints_3d=torch.randn(bs, 24, 3) * 0.3, keypoints_3d_full=torch.randn(bs, 24, 3) * 0.3 + 3,
                 gender=torch.tensor([0, 1] * (bs // 2) + [0] * (bs % 2)))
    batch['smpl_params'].update(global_orient=torch.randn(bs, 3) * 0.3, body_pose=torch.randn(bs, 69) * 0.2,
                                betas=torch.randn(bs, 10) * 0.5)
    return batch


def test_compute_loss_train_and_eval(model):
    batch = batch_with_gt(seed=4)
    with torch.no_grad():
        out = model(batch, torch.tensor([3, 7]))
        loss = model.compute_loss(batch, out)
    losses = out['losses']
    assert float(loss) == 0.0 and float(losses['loss_v2v']) > 0     # test-time weights are zero
    assert 0 <= int(out['joint_vis_num_batch']) <= 48
    assert float(losses['loss_keypoints_3d_vis_batch_sum']) >= 0
    # training returns the same keys, the visible-joint sum as 0 (as the original)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model.train()
        with torch.no_grad():
            train_out = model(batch, torch.tensor([3, 7]))
            model.compute_loss(batch, train_out)
    finally:
        model.load_state_dict(saved)
        model.eval()
    assert sorted(train_out['losses']) == sorted(losses)
    assert float(train_out['losses']['loss_keypoints_3d_vis_batch_sum']) == 0.0


# ------------------------------------------------------------------------------------------------ collision
class SphereOccupancy:
    """Occupancy ~1 inside a 25 cm sphere around the mean of the knees and ankles (a differentiable COAP stand-in)."""

    def query(self, points, body):
        d = (points - body.joints[:, [4, 5, 7, 8]].mean(dim=1, keepdim=True)).norm(dim=-1)
        return torch.sigmoid((0.25 - d) * 40.0)

    def collision_loss(self, points, body):
        return torch.relu(self.query(points, body) - 0.5).sum(dim=-1)


def test_box_filter_cap_and_padding():
    verts = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    pts = torch.rand(6000, 3) * 0.98 + 0.01
    pts[10] = torch.tensor([2.0, 0.5, 0.5])
    mask = collision.box_mask_with_cap(pts, verts, 4000)
    assert not mask[4000:].any() and int(mask.sum()) == 3999          # indices >= 4000 dropped, 10 is outside
    assert collision.points_in_body_box(torch.tensor([[1.0, 1.0, 1.0]]), verts).item()   # inclusive


def test_batched_collision_equals_per_body_loop(model):
    occ = SphereOccupancy()
    batch = random_batch(bs=3, num_points=400, seed=5)
    with torch.no_grad():
        out = model(batch, torch.tensor([0, 0, 0]))
        legs = out['pred_keypoints_3d'][:, [4, 5, 7, 8]].mean(dim=1, keepdim=True)
        scene = legs + 0.3 * torch.randn(3, 400, 3, generator=torch.Generator().manual_seed(1))
        scene[1] += 100.0                                    # no point in body 1's box
        batched = collision.penetration_loss(occ, scene, out['pred_vertices'], out['pred_keypoints_3d'],
                                             out['pred_rotmats'], max_point_index=None)
        body = collision.body_for_occupancy(out['pred_vertices'], out['pred_keypoints_3d'], out['pred_rotmats'])
        for i in range(3):
            mask = collision.points_in_body_box(scene[i], body.vertices[i])
            single = collision.SMPLOutput(vertices=body.vertices[i:i + 1], joints=body.joints[i:i + 1],
                                          full_pose=body.full_pose[i:i + 1])
            expected = occ.collision_loss(scene[i][mask][None], single).sum() if mask.any() else torch.tensor(0.0)
            assert batched[i].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
        ratio = collision.collision_ratio(occ, scene, out['pred_vertices'], out['pred_keypoints_3d'],
                                          out['pred_rotmats'])
    assert batched[1].item() == 0.0 and ratio[1] == 0.0 and batched[0].item() > 0 and 0 < ratio[0] <= 1


def test_guidance_gradient_only_on_leg_joints(model):
    from egohmr.guidance import collision_guidance_gradient
    occ = SphereOccupancy()
    batch = random_batch(bs=2, num_points=600, seed=6)
    with torch.no_grad():
        out = model(batch, torch.tensor([5, 5]))
    legs = out['pred_keypoints_3d'][:, [4, 5, 7, 8]].mean(dim=1, keepdim=True)
    scene = legs + 0.2 * torch.randn(2, 600, 3, generator=torch.Generator().manual_seed(0))
    grad = collision_guidance_gradient(model, batch['x_t'], out['pred_smpl_params']['betas'], scene, occ)
    assert grad is not None and grad.shape == (2, 144)
    per_joint = grad.reshape(2, 24, 6).abs().sum(dim=(0, 2))
    allowed = [1, 2, 4, 5, 7, 8, 10, 11]
    assert torch.all(per_joint[[j for j in range(24) if j not in allowed]] == 0)
    assert per_joint[allowed].sum() > 0
    far = scene + 100.0
    assert collision_guidance_gradient(model, batch['x_t'], out['pred_smpl_params']['betas'], far, occ) is None


def test_batched_chain_gives_each_body_the_gradient_of_its_own_chain(model):
    """S=3 samples of bs=2 images in ONE chain of 6 rows: every body's guidance gradient equals the one it gets in
    its own S=1 chain of 2 rows (the original's mean over the images of one chain), not a third of it."""
    from egohmr.evaluate import sampling_batch
    from egohmr.guidance import CollisionGuidance
    occ, samples, bs = SphereOccupancy(), 3, 2
    guidance = CollisionGuidance(model, occ, weight=2.0)
    batch = random_batch(bs=bs, num_points=600, seed=8)
    with torch.no_grad():
        condition = model.sampling_condition(batch)
        # guidance poses the body with x_t itself: put the scene around the legs of x_t's body
        rot = model.rotmats_from_x(batch['x_t'])
        legs = model.smpl(global_orient=rot[:, :1], body_pose=rot[:, 1:], pose2rot=False).joints[:, [4, 5, 7, 8]]
    scene = legs.mean(dim=1, keepdim=True) + 0.2 * torch.randn(bs, 600, 3, generator=torch.Generator().manual_seed(2))
    condition['scene_points'] = scene
    noise = 0.1 * torch.randn(samples * bs, 144, generator=torch.Generator().manual_seed(3))
    x_t = batch['x_t'].repeat(samples, 1) + noise                 # row s*bs + i: sample s of image i
    chain = sampling_batch(batch, condition, samples)
    with torch.no_grad():
        out = model.denoise(x_t, torch.full((samples * bs,), 5), chain)
    batched = guidance.gradient(x_t, out, chain)
    assert batched is not None
    for s in range(samples):
        rows = slice(s * bs, (s + 1) * bs)
        single_chain = sampling_batch(batch, condition, 1)
        with torch.no_grad():
            single_out = model.denoise(x_t[rows], torch.full((bs,), 5), single_chain)
        single = guidance.gradient(x_t[rows], single_out, single_chain)
        assert single is not None and single.abs().sum() > 0
        torch.testing.assert_close(batched[rows], single, rtol=1e-4, atol=1e-7)


class ConstantGradientGuidance:
    """A CollisionGuidance whose COAP gradient is a fixed tensor, to check the step rule by hand."""

    def __new__(cls, grad, weight):
        from egohmr.guidance import CollisionGuidance

        class Fixed(CollisionGuidance):
            def gradient(self, x, model_output, batch, step=0):
                return grad.clone()
        return Fixed(model=None, occupancy_model=object(), weight=weight)


@pytest.mark.parametrize('respacing', ['', 'ddim5'])
def test_ddpm_guidance_rule_uses_the_chains_own_step_index(respacing):
    """t[0] <= 10 guided; posterior variance of THIS chain for t[0] >= 5, 0.01 below; on a respaced chain the
    respaced index decides (ddim5 respacing: all five DDPM steps guided with the 0.01 rule, as the original)."""
    from diffusion import create_gaussian_diffusion
    grad, weight = torch.tensor([[1.0, -2.0, 0.5]]), 2.0
    diffusion = create_gaussian_diffusion(50, respacing)
    guidance = ConstantGradientGuidance(grad, weight)
    guided_steps = []
    for j in range(diffusion.num_timesteps):
        t = torch.full((1,), j, dtype=torch.long)
        variance = torch.full_like(grad, float(diffusion.posterior_variance[j]))
        shift = guidance.condition_mean(grad, t, {'variance': variance, 'model_output': {}}, {})
        if j > 10:
            assert shift is None
            continue
        guided_steps.append(j)
        expected = weight * (diffusion.posterior_variance[j] if j >= 5 else 0.01) * grad.double()
        np.testing.assert_allclose(shift.double().numpy(), expected.numpy(), rtol=1e-6)
    assert guided_steps == list(range(min(11, diffusion.num_timesteps)))


def test_ddim_guidance_rule_and_final_step():
    from diffusion import create_gaussian_diffusion
    grad = torch.tensor([[0.5, -1.0, 2.0]])
    guidance = ConstantGradientGuidance(grad, weight=7.0)
    for j in range(5):
        score = guidance.condition_score(grad, torch.full((1,), j), {'model_output': {}}, {})
        if j <= 3:
            torch.testing.assert_close(score, grad)      # scale 1: the weight is ignored
        else:
            assert score is None
    x0 = torch.tensor([[0.1, 0.2, 0.3]])
    torch.testing.assert_close(guidance.final_step(x0, {}, {}), x0 + 7.0 * 0.01 * grad)
    # through the core: a ddim5 chain calls the hook at every step, and only j <= 3 changes the result
    calls = []

    class Recording(type(guidance)):
        def condition_score(self, x, t, p_mean_var, batch):
            calls.append(int(t[0]))
            return super().condition_score(x, t, p_mean_var, batch)
    recording = Recording(model=None, occupancy_model=object(), weight=1.0)
    model = lambda x, t, batch: {'pred_x_start': torch.zeros_like(x)}   # noqa: E731
    create_gaussian_diffusion(50, 'ddim5').sample(model, (1, 3), method='ddim', model_kwargs={'batch': {}},
                                                  guidance=recording)
    assert calls == [4, 3, 2, 1, 0]


# ------------------------------------------------------------------------------------------------ sampling
def test_sampling_encodes_once_and_returns_all_samples(model):
    from diffusion import create_gaussian_diffusion
    from egohmr.evaluate import sample_poses, tile, untile
    x = torch.arange(6).reshape(2, 3)
    assert torch.equal(untile(tile(x, 4), 4)[:, 2], x)
    calls = []
    handle = model.backbone.register_forward_hook(lambda *a: calls.append(1))
    try:
        torch.manual_seed(0)
        samples = sample_poses(model, create_gaussian_diffusion(50, 'ddim5'), random_batch(seed=7), 3, 'ddim',
                               occupancy_model=SphereOccupancy())
    finally:
        handle.remove()
    assert len(calls) == 1
    assert samples['body_pose'].shape == (2, 3, 23, 3, 3) and samples['betas'].shape == (2, 3, 10)
    assert samples['vertices'].shape == (2, 3, 6890, 3) and samples['collision_ratio'].shape == (2, 3)
    assert not torch.allclose(samples['rotmats'][:, 0], samples['rotmats'][:, 1])   # different noise per sample
    torch.testing.assert_close(samples['betas'][:, 0], samples['betas'][:, 1])      # betas do not depend on x_t


def _rows(batch, rows):
    return {k: (_rows(v, rows) if isinstance(v, dict) else v[rows]) for k, v in batch.items()}


def test_samples_of_a_frame_do_not_depend_on_its_batch(model):
    """Per-frame streams (utils.frame_rng): guided DDPM (ddim5 respacing: every step guided) with COAP and the
    collision ratio; frame f's samples are the same in a batch of 2 with one chain, and in batches of 1 + 1 (one chain
    per sample, and one for both) (to float rounding: BLAS sums a few rows and many rows in different orders)."""
    from diffusion import create_gaussian_diffusion
    from egohmr.evaluate import sample_poses
    from egohmr.guidance import CollisionGuidance
    assert model.coap is not None
    batch = random_batch(bs=2, num_points=200, seed=3)
    batch['frame_index'] = torch.tensor([10, 11])
    diffusion = create_gaussian_diffusion(50, 'ddim5')
    guidance = CollisionGuidance(model, model.coap, 2.0)

    def draw(part, per_chain=None):
        return sample_poses(model, diffusion, part, 2, 'ddpm', guidance=guidance, occupancy_model=model.coap,
                            samples_per_chain=per_chain, sample_seed=5)
    whole = draw(batch)
    split = [draw(_rows(batch, slice(0, 1)), per_chain=1), draw(_rows(batch, slice(1, 2)))]
    assert whole['collision_ratio'].max() > 0                     # the guided bodies do meet the scene
    np.testing.assert_array_equal(whole['collision_ratio'],
                                  np.concatenate([s['collision_ratio'] for s in split]))
    for key in ('rotmats', 'betas', 'joints', 'vertices'):
        torch.testing.assert_close(whole[key], torch.cat([s[key] for s in split]), rtol=0, atol=1e-5)
    assert not torch.allclose(whole['rotmats'][:, 0], whole['rotmats'][:, 1], atol=1e-6)   # two streams, two samples
    with pytest.raises(ValueError, match="frame_index"):
        sample_poses(model, diffusion, _rows(batch, slice(0, 1)) | {'frame_index': None}, 1, 'ddim', sample_seed=0)


def test_bf16_training_step_tracks_the_fp32_step(model):
    """``train_step(precision='bf16')``: the forward under bf16 autocast (decode, losses and optimiser in fp32) gives
    the fp32 step's loss terms to within bf16 rounding, finite fp32 gradients and an update of every weight."""
    import copy

    from diffusion import UniformSampler, create_gaussian_diffusion
    from egohmr.trainer import train_step

    batch = batch_with_gt(seed=9)
    diffusion = create_gaussian_diffusion(50, '')
    runs = {}
    for precision in ('fp32', 'bf16'):
        net = copy.deepcopy(model)
        before = {k: v.clone() for k, v in net.named_parameters() if v.requires_grad}
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        torch.manual_seed(17)
        np.random.seed(17)                                          # UniformSampler draws t with numpy
        losses = train_step(net, diffusion, UniformSampler(diffusion), dict(batch), optimizer, 0, precision)
        grads = [p.grad for p in net.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)
        moved = [k for k, v in net.named_parameters() if v.requires_grad and not torch.equal(v, before[k])]
        runs[precision] = (losses, len(moved))
    (fp32, moved32), (bf16, moved16) = runs['fp32'], runs['bf16']
    assert sorted(fp32) == sorted(bf16) and moved16 == moved32 > 0
    assert fp32 != bf16                                              # bf16 did run
    for key, value in fp32.items():
        assert abs(bf16[key] - value) <= 0.05 * abs(value) + 1e-6, key
    with pytest.raises(ValueError, match='--precision'):
        train_step(copy.deepcopy(model), diffusion, UniformSampler(diffusion), dict(batch),
                   torch.optim.AdamW(model.parameters(), lr=0.0), 0, 'fp16')
