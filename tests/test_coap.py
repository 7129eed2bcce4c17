"""COAP: part partition, surface sampling, state_dict vs the manifest, bone frames, occupancy queries, checkpoints
(official layout without Lightning), the exact winding-number occupancy, and a briefly trained model."""
from __future__ import annotations

import os
import sys
import types
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from egohmr.coap import COAPBodyModel, ExactOccupancy, attach_coap, load_coap_checkpoint, save_coap_checkpoint
from egohmr.coap.checkpoint import load_coap_state_dict
from egohmr.coap.exact import inside_mesh, winding_numbers
from egohmr.coap.partition import MERGED_JOINTS, PART_JOINTS, majority_face_labels, merge_labels
from egohmr.coap.sampling import sample_points_on_faces
from egohmr.coap.training import (PairPool, TrainSettings, build_pair_pool, inside_labels, iou, load_mocap,
                                  pair_logits, pose_bodies, standardise_codes_, train_coap, vertex_parts)
from utils.body_model import SMPL_PARENTS, create_smpl
from utils.io import DataError

SPEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets', 'manifests')
MANIFEST = os.path.join(SPEC, 'coap_smpl_neutral.tsv')
FORWARD_IO = os.path.join(SPEC, 'coap_forward_io.json')
MESH_DEPENDENT = ('partitioner.tight_face_tensor', 'partitioner.extended_face_tensor',
                  'partitioner.tight_vert_selector')


@pytest.fixture(scope='module')
def smpl(body_model_dir):
    return create_smpl(body_model_dir, 'neutral')


@pytest.fixture(scope='module')
def coap(smpl):
    torch.manual_seed(0)
    return COAPBodyModel(smpl).eval()


@pytest.fixture(scope='module')
def mocap(body_model_dir):
    return load_mocap(os.path.join(body_model_dir, 'datasets', 'cmu_mocap.npz'))


def posed(smpl, pose: np.ndarray, betas=None):
    pose = torch.as_tensor(pose, dtype=torch.float32).reshape(-1, 72)
    betas = torch.zeros(len(pose), 10) if betas is None else betas
    with torch.no_grad():
        out = smpl(global_orient=pose[:, :3], body_pose=pose[:, 3:], betas=betas, return_full_pose=True)
    return SimpleNamespace(vertices=out.vertices, joints=out.joints, full_pose=out.full_pose)


def faces_of(smpl) -> np.ndarray:
    return smpl.faces_tensor.numpy().astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Partition
# ----------------------------------------------------------------------------------------------------------------

def test_merge_labels_follow_the_merge_table():
    labels, parents, label_of = merge_labels(np.arange(24), SMPL_PARENTS)
    expected = {23: 21, 22: 20, 15: 12, 14: 9, 13: 9, 11: 8, 10: 7, 3: 0}
    for joint in range(24):
        assert labels[joint] == expected.get(joint, joint)
        assert label_of[joint] == expected.get(joint, joint)
    # Children of merged joints are re-parented to the merged joint's parent.
    assert parents[6] == 0 and parents[16] == 9 and parents[17] == 9 and parents[12] == 9
    assert sorted(set(labels.tolist())) == list(PART_JOINTS) and len(PART_JOINTS) == 16
    assert MERGED_JOINTS == (23, 22, 15, 14, 13, 11, 10, 3)


def test_face_label_is_majority_with_ties_to_the_smaller_label():
    vertex_labels = np.array([5, 5, 2, 7, 9, 8, 8, 3])
    faces = np.array([[0, 1, 2], [2, 3, 4], [7, 5, 6], [4, 3, 7], [2, 0, 1]])
    assert majority_face_labels(faces, vertex_labels).tolist() == [5, 2, 8, 3, 5]
    # Brute force: bincount argmax (ties -> smallest) on random labels.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 300)
    tris = rng.integers(0, 300, (500, 3))
    brute = [np.bincount(labels[np.unique(f)]).argmax() for f in tris]
    assert majority_face_labels(tris, labels).tolist() == brute


def test_face_label_counts_each_unique_vertex_once():
    """The original labels a face by bincount(...).argmax() over np.unique of its vertex ids: a degenerate face
    [a, a, b] is a 1-1 tie between the labels of a and b (smaller label), not a 2-1 majority for a."""
    vertex_labels = np.array([6, 2, 4, 6])
    faces = np.array([[0, 0, 1],      # unique {0, 1}: labels 6, 2 -> tie -> 2 (counting vertex 0 twice gives 6)
                      [1, 2, 1],      # unique {1, 2}: 2, 4 -> 2
                      [2, 2, 2],      # unique {2}: 4
                      [0, 3, 3],      # unique {0, 3}: 6, 6 -> 6
                      [0, 1, 3]])     # three distinct: 6, 2, 6 -> 6
    assert majority_face_labels(faces, vertex_labels).tolist() == [2, 2, 4, 6, 6]
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 40)
    tris = rng.integers(0, 40, (400, 3))
    tris[::3, 1] = tris[::3, 0]                      # many degenerate faces
    brute = [np.bincount(labels[np.unique(f)]).argmax() for f in tris]
    assert majority_face_labels(tris, labels).tolist() == brute


def test_partition_tables_match_brute_force(smpl, coap):
    part = coap.partitioner
    faces = faces_of(smpl)
    labels = smpl.lbs_weights.numpy().argmax(axis=1)
    merged = {23: 21, 22: 20, 15: 12, 14: 9, 13: 9, 11: 8, 10: 7, 3: 0}
    labels = np.array([merged.get(int(x), int(x)) for x in labels])
    face_labels = np.array([np.bincount(labels[f]).argmax() for f in faces])
    assert part.joint_mapper.tolist() == [j in PART_JOINTS for j in range(24)]
    assert part.parents.tolist() == SMPL_PARENTS
    tight, ext, sel = part.tight_face_tensor, part.extended_face_tensor, part.tight_vert_selector
    assert tight.dtype == torch.int32 and ext.dtype == torch.int32 and sel.dtype == torch.int64
    assert tight.shape[0] == ext.shape[0] == sel.shape[0] == 16
    neighbours = {0: {0, 1, 2, 6}, 4: {4, 1, 7}, 9: {9, 6, 12, 16, 17}, 18: {18, 16, 20}, 20: {20, 18}}
    seen = []
    for k, joint in enumerate(PART_JOINTS):
        rows = tight[k].numpy()
        valid = rows[rows[:, 0] >= 0]
        assert (rows[len(valid):] == -1).all(), 'padding must be trailing -1 rows'
        assert sorted(map(tuple, valid)) == sorted(map(tuple, faces[face_labels == joint]))
        seen.append(len(valid))
        verts = np.flatnonzero(labels == joint)
        row = sel[k].numpy()
        assert row[:len(verts)].tolist() == verts.tolist() and (row[len(verts):] == verts[0]).all()
        if joint in neighbours:
            erows = ext[k].numpy()
            evalid = erows[erows[:, 0] >= 0]
            want = faces[np.isin(face_labels, sorted(neighbours[joint]))]
            assert sorted(map(tuple, evalid)) == sorted(map(tuple, want))
    assert sum(seen) == len(faces) and tight.shape[1] == max(seen)


# ----------------------------------------------------------------------------------------------------------------
# Surface sampling
# ----------------------------------------------------------------------------------------------------------------

def test_surface_samples_lie_on_their_faces_with_area_weights():
    # Two triangles in the z=0 plane with areas 0.5 and 1.5; one padded set.
    verts = torch.tensor([[[0., 0, 0], [1, 0, 0], [0, 1, 0], [3, 0, 0], [6, 0, 0], [3, 1, 0]]], requires_grad=True)
    faces = torch.tensor([[[0, 1, 2], [3, 4, 5], [-1, -1, -1]],
                          [[3, 4, 5], [-1, -1, -1], [-1, -1, -1]]], dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    pts = sample_points_on_faces(verts, faces, 4000, generator=gen)
    assert pts.shape == (1, 2, 4000, 3)
    p = pts.detach()[0]
    assert torch.all(p[..., 2] == 0)
    on_first = (p[0, :, 0] + p[0, :, 1] <= 1 + 1e-6) & (p[0, :, 0] <= 1 + 1e-6)
    on_second = (p[0, :, 0] >= 3 - 1e-6) & (p[0, :, 1] <= 1 - (p[0, :, 0] - 3) / 3 + 1e-6)
    assert bool((on_first | on_second).all())
    assert abs(on_first.float().mean().item() - 0.25) < 0.03
    assert bool(((p[1, :, 0] >= 3 - 1e-6) & (p[1, :, 1] <= 1 - (p[1, :, 0] - 3) / 3 + 1e-6)).all())
    # Uniform on the triangle: the mean is the centroid.
    assert torch.allclose(p[1].mean(0), torch.tensor([4.0, 1 / 3, 0.0]), atol=0.05)
    pts.sum().backward()
    assert verts.grad is not None and verts.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# State dict and forward shapes
# ----------------------------------------------------------------------------------------------------------------

def read_manifest(path):
    rows = []
    with open(path) as f:
        for line in f:
            if line.startswith('#') or not line.strip():
                continue
            key, shape, dtype, kind = line.rstrip('\n').split('\t')
            rows.append((key, tuple(int(s) for s in shape.split(',')) if shape else (), dtype, kind))
    return rows


def test_state_dict_matches_manifest(coap):
    manifest = read_manifest(MANIFEST)
    params = {name for name, _ in coap.named_parameters()}
    ours = [(k, tuple(v.shape), str(v.dtype).replace('torch.', ''), 'param' if k in params else 'buffer')
            for k, v in coap.state_dict().items()]
    assert [r[0] for r in ours] == [r[0] for r in manifest]
    for (key, shape, dtype, kind), (_, m_shape, m_dtype, m_kind) in zip(ours, manifest):
        assert (dtype, kind) == (m_dtype, m_kind), key
        if key in MESH_DEPENDENT:  # padded sizes follow the body mesh
            assert shape[0] == m_shape[0] and shape[2:] == m_shape[2:], key
        else:
            assert shape == m_shape, key
    assert sum(p.numel() for p in coap.parameters()) == 840170


def test_forward_shapes_match_forward_io(coap, smpl, mocap):
    import json
    with open(FORWARD_IO) as f:
        io = json.load(f)
    body = posed(smpl, mocap[:1])
    points = torch.randn(1, 689, 3) * 0.4
    occ, extra = coap.query(points, body, ret_intermediate=True)
    expected = io['query(points [B,T,3], smpl_output)']
    assert list(occ.shape) == expected['occupancy']
    assert list(extra['part_occupancy'].shape) == expected['part_occupancy']
    assert list(extra['all_out'].shape) == expected['all_out']
    for key, shape in io['impl_code (cached after encode_body)'].items():
        assert list(coap.impl_code[key].shape) == shape, key
    loss_key = 'collision_loss(points, smpl_output, ret_collision_mask=None)'
    assert list(coap.collision_loss(points, body).shape) == io[loss_key]


def test_bone_frames_equal_the_body_models_rigid_transforms(coap, smpl, mocap):
    from smplx.lbs import batch_rigid_transform, vertices2joints
    from utils.geometry import aa_to_rotmat

    body = posed(smpl, mocap[:3])
    frames = coap.part_transforms(body.full_pose, body.joints)                # [B, 16, 4, 4]
    rest_joints = vertices2joints(smpl.J_regressor, smpl.v_template[None].expand(3, -1, -1))
    rot = aa_to_rotmat(body.full_pose.reshape(3, 24, 3))
    posed_joints, rel = batch_rigid_transform(rot, rest_joints, smpl.parents)
    keep = list(PART_JOINTS)
    assert torch.allclose(frames[..., :3, :3], rel[:, keep, :3, :3], atol=1e-5)
    assert torch.allclose(frames[..., :3, 3], body.joints[:, keep], atol=1e-5)
    assert torch.allclose(frames[..., :3, 3], posed_joints[:, keep], atol=1e-5)
    # bone_trans is the exact inverse.
    bone = coap.compute_bone_trans(body.full_pose, body.joints)
    assert torch.allclose(bone @ frames, torch.eye(4).expand_as(frames), atol=1e-5)


def test_query_matches_dense_evaluation_of_every_part(coap, smpl, mocap):
    """The sparse evaluation equals the original formula: every part evaluated, then masked by its box."""
    body = posed(smpl, mocap[3:5])
    torch.manual_seed(1)
    points = body.vertices[:, ::40] + 0.03 * torch.randn(2, (6890 + 39) // 40, 3)
    with torch.no_grad():
        occ, extra = coap.query(points, body, ret_intermediate=True)
        code = coap.impl_code
        B, K, T = 2, 16, points.shape[1]
        local = (code['bone_trans'][:, :, None] @ torch.cat([points, torch.ones(B, T, 1)], -1)[:, None, :, :, None])
        local = local[..., :3, 0]
        inside = ((local - code['bbox_center']).abs() < code['bbox_size'] / 2).all(-1)
        z = torch.cat([local, inside[..., None].float(), coap.k_one_hot[None, :, None].expand(B, K, T, K),
                       code['latent_code'][:, :, None].expand(B, K, T, 128)], dim=-1)
        logits = coap.decoder(torch.cat([local, coap.query_encoder(z)], dim=-1))[..., 0]
        dense = torch.sigmoid(-logits) * inside
    assert torch.allclose(extra['part_occupancy'], dense, atol=1e-5)
    assert torch.allclose(occ, dense.max(dim=1).values, atol=1e-5)
    assert torch.equal(extra['all_out'], ~inside.any(1))
    assert 0.0 < inside.float().mean() < 1.0
    loss, mask = coap.collision_loss(points, body, ret_collision_mask=True)
    assert torch.allclose(loss, torch.relu(occ - 0.5).sum(-1), atol=1e-5)
    assert torch.equal(mask, occ > 0.5)


def test_body_code_is_cached_until_the_pose_changes(coap, smpl, mocap):
    body = posed(smpl, mocap[5:6])
    points = body.vertices[:, :50]
    coap.detach_cache()
    with torch.no_grad():
        coap.query(points, body)
        first = coap.impl_code
        coap.query(points, SimpleNamespace(vertices=body.vertices, joints=body.joints.clone(),
                                           full_pose=body.full_pose.clone()))
        assert coap.impl_code is first
        coap.query(points, posed(smpl, mocap[6:7]))
        assert coap.impl_code is not first
    with pytest.raises(ValueError, match='axis-angle'):
        coap.query(points, SimpleNamespace(vertices=body.vertices, joints=body.joints,
                                           full_pose=torch.eye(3).expand(1, 24, 3, 3)))


def test_collision_loss_gradient_reaches_the_pose(smpl, mocap):
    torch.manual_seed(0)
    model = COAPBodyModel(smpl).requires_grad_(False)
    pose = torch.tensor(mocap[:1], requires_grad=True)
    out = smpl(global_orient=pose[:, :3], body_pose=pose[:, 3:], return_full_pose=True)
    loss = model.collision_loss(out.vertices.detach()[:, ::20] * 0.98, out)
    loss.sum().backward()
    assert pose.grad is not None and torch.isfinite(pose.grad).all() and pose.grad.abs().sum() > 0


def test_collision_loss_pose_gradients_are_bit_reproducible(smpl, mocap):
    """Sparse and dense collision losses: repeated calls give bit-identical gradients w.r.t. the pose (through the
    part frames and codes; the vertices are detached). Their rows repeat once per colliding point, which the
    backward of advanced indexing (index_put_ with accumulate, parallel atomics on CPU) summed in a varying order."""
    model = COAPBodyModel(smpl).eval().requires_grad_(False)
    load_coap_checkpoint(model, ASSET)
    pose = torch.tensor(mocap[:4], requires_grad=True)
    g = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)                    # the atomic path needs > 1 thread
    try:
        for loss_name in ('sparse_collision_loss', 'collision_loss'):
            grads = []
            for _ in range(4):
                pose.grad = None
                out = smpl(global_orient=pose[:, :3], body_pose=pose[:, 3:], return_full_pose=True)
                body = SimpleNamespace(vertices=out.vertices.detach(), joints=out.joints, full_pose=out.full_pose)
                if not grads:
                    pick = torch.randint(6890, (2000,), generator=g)
                    points = out.vertices.detach()[:, pick] + 0.03 * torch.randn(4, 2000, 3, generator=g)
                torch.manual_seed(5)
                model.detach_cache()
                loss = getattr(model, loss_name)(points, body)
                assert loss.min() > 10      # many colliding points per part
                loss.sum().backward()
                grads.append(pose.grad.clone())
            assert grads[0].abs().sum() > 0
            assert all(torch.equal(grads[0], other) for other in grads[1:]), loss_name
    finally:
        torch.set_num_threads(threads)
        model.detach_cache()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path, smpl, coap, mocap):
    path = str(tmp_path / 'coap.ckpt')
    save_coap_checkpoint(coap, path, epoch=2, global_step=7)
    raw = torch.load(path, weights_only=False)
    assert raw['pytorch-lightning_version'].startswith('none') and raw['global_step'] == 7
    assert list(raw['state_dict']) == list(coap.state_dict())
    fresh = attach_coap(create_smpl_like(smpl), checkpoint=path, frozen=True).coap
    for key, value in coap.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert not any(p.requires_grad for p in fresh.parameters())
    body = posed(smpl, mocap[:1])
    torch.manual_seed(3)
    a = coap.query(body.vertices[:, ::50], body)
    torch.manual_seed(3)
    b = fresh.query(body.vertices[:, ::50], body)
    assert torch.equal(a, b)


def create_smpl_like(smpl):
    """The same body model object type without COAP attached (attach_coap sets .coap on it)."""
    import copy
    clone = copy.deepcopy(smpl)
    if hasattr(clone, 'coap'):
        del clone.coap
    return clone


def test_lightning_checkpoint_loads_without_lightning(tmp_path, smpl, coap):
    """A PL-style file with classes from modules that are not installed loads strictly via stand-ins."""
    module = types.ModuleType('pytorch_lightning_fake_parsing')

    class AttributeDict(dict):
        pass

    class TrainerFn:
        def __init__(self, value):
            self.value = value

    for cls in (AttributeDict, TrainerFn):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
    module.AttributeDict, module.TrainerFn = AttributeDict, TrainerFn
    sys.modules[module.__name__] = module
    try:
        ckpt = {'epoch': 12, 'global_step': 3400, 'pytorch-lightning_version': '1.6.1',
                'state_dict': coap.state_dict(), 'hyper_parameters': AttributeDict(lr=1e-4),
                'loops': {'fit_loop': {'state': TrainerFn('fit')}},
                'callbacks': {"ModelCheckpoint{'monitor': None}": {'best_model_score': torch.tensor(0.9)}},
                'optimizer_states': [{'state': {}, 'param_groups': [{'lr': 1e-4}]}], 'lr_schedulers': []}
        path = str(tmp_path / 'official.ckpt')
        torch.save(ckpt, path)
    finally:
        del sys.modules[module.__name__]
    fresh = COAPBodyModel(faces=faces_of(smpl), lbs_weights=smpl.lbs_weights.numpy(), parents=SMPL_PARENTS)
    raw = load_coap_checkpoint(fresh, path)
    assert raw['epoch'] == 12 and raw['hyper_parameters'] is not None
    for key, value in coap.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_checkpoint_errors_and_foreign_mesh_tables(tmp_path, smpl, coap):
    state = coap.state_dict()
    # A checkpoint made on another mesh: different table sizes -> kept recomputed, with one clear warning.
    foreign = dict(state)
    foreign['partitioner.tight_face_tensor'] = torch.full((16, 1722, 3), -1, dtype=torch.int32)
    fresh = COAPBodyModel(faces=faces_of(smpl), lbs_weights=smpl.lbs_weights.numpy(), parents=SMPL_PARENTS)
    with pytest.warns(UserWarning, match='different body mesh.*tight_face_tensor'):
        differing = load_coap_state_dict(fresh, foreign, 'foreign.ckpt')
    assert list(differing) == ['tight_face_tensor']
    assert torch.equal(fresh.partitioner.tight_face_tensor, coap.partitioner.tight_face_tensor)
    assert torch.equal(fresh.decoder.lin6.weight, coap.decoder.lin6.weight)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        load_coap_state_dict(fresh, state)  # same mesh: silent
    missing = {k: v for k, v in state.items() if k != 'decoder.lin6.bias'}
    with pytest.raises(DataError, match='missing keys.*decoder.lin6.bias'):
        load_coap_state_dict(fresh, missing, 'x.ckpt')
    wrong = dict(state, **{'encoder.fc_c.weight': torch.zeros(3, 3)})
    with pytest.raises(DataError, match='encoder.fc_c.weight'):
        load_coap_state_dict(fresh, wrong, 'x.ckpt')
    with pytest.raises(DataError, match='missing COAP checkpoint'):
        load_coap_checkpoint(fresh, str(tmp_path / 'nope.ckpt'))
    bad = tmp_path / 'bad.ckpt'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(DataError, match='cannot read COAP checkpoint'):
        load_coap_checkpoint(fresh, str(bad))
    # A stage-2 EgoHMR state dict carries the same tensors under smpl.coap.*
    path = str(tmp_path / 'stage2.pt')
    torch.save({'state_dict': {f'smpl.coap.{k}': v for k, v in state.items()}}, path)
    load_coap_checkpoint(fresh, path)


# ----------------------------------------------------------------------------------------------------------------
# Exact occupancy
# ----------------------------------------------------------------------------------------------------------------

def test_winding_number_labels_on_a_self_intersecting_union():
    import trimesh
    a = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    b = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    verts = np.concatenate([a.vertices, b.vertices + [1.0, 0, 0]])
    faces = np.concatenate([a.faces, b.faces + len(a.vertices)])
    pts = np.array([[0.5, 0, 0], [-0.9, 0, 0], [1.9, 0, 0], [3.0, 0, 0], [0.5, 1.2, 0], [0.5, 0.8, 0]])
    w = winding_numbers(verts, faces, pts)
    assert np.allclose(w, [2, 1, 1, 0, 0, 2], atol=0.05)   # overlap counts twice: ray parity would say "outside"
    assert inside_mesh(verts, faces, pts).tolist() == [True, True, True, False, False, True]


def test_exact_occupancy_values_and_gradients():
    import trimesh
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    verts = torch.tensor(sphere.vertices, dtype=torch.float64)[None].requires_grad_(True)
    exact = ExactOccupancy(sphere.faces, temperature=0.02)
    pts = torch.tensor([[[0.0, 0, 0.45], [0, 0, 0.3], [0, 0, 0.55], [0.2, 0.1, 0.0], [0, 0, 1.0]]],
                       dtype=torch.float64)
    body = SimpleNamespace(vertices=verts)
    occ, extra = exact.query(pts, body, ret_intermediate=True)
    sd = extra['signed_distance'][0].detach().numpy()
    radius = np.linalg.norm(pts[0].numpy(), axis=1)
    assert np.allclose(sd, 0.5 - radius, atol=0.005)          # signed distance of a (fine) sphere
    assert ((occ > 0.5)[0].tolist()) == [True, True, False, True, False]
    loss = exact.collision_loss(pts, body)
    assert torch.allclose(loss, torch.relu(occ - 0.5).sum(-1))
    loss.sum().backward()
    # Growing the sphere deepens every inside point: the loss gradient along the radial direction is positive.
    radial = (verts.grad[0] * verts.detach()[0]).sum()
    assert radial > 0
    # The gradient matches a finite difference of a uniform scaling.
    with torch.no_grad():
        scaled = SimpleNamespace(vertices=verts.detach() * (1 + 1e-4))
        fd = (exact.collision_loss(pts, scaled) - loss.detach()) / 1e-4
    assert torch.allclose(radial, fd[0], rtol=0.05)


# ----------------------------------------------------------------------------------------------------------------
# Training data and the training forward pass
# ----------------------------------------------------------------------------------------------------------------

def test_pair_logits_equal_the_full_query_network(smpl):
    """The split first/skip layers compute exactly what query() computes from the full 148-d input."""
    torch.manual_seed(0)
    model = COAPBodyModel(smpl)
    latent = torch.randn(3, 16, 128)
    body = torch.randint(3, (400,))
    part = torch.randint(16, (400,))
    local = 0.2 * torch.randn(400, 3)
    features = torch.cat([local, torch.ones(400, 1), model.k_one_hot[part], latent[body, part]], dim=-1)
    full = model.decoder(torch.cat([local, model.query_encoder(features)], dim=-1))[:, 0]
    split = pair_logits(model, latent, body, part, local)
    assert torch.allclose(split, full, atol=1e-4 * full.abs().max().item())
    # Gradients reach the same parameters.
    split.sum().backward()
    assert model.query_encoder.lin0.weight.grad[:, 20:].abs().sum() > 0
    assert model.query_encoder.lin2.weight.grad.abs().sum() > 0


def test_pair_logits_gradients_are_bit_reproducible(smpl):
    """The same pairs give bit-identical gradients on every call. The per-part term is gathered with index_select:
    the backward of ``term[body, part]`` (index_put_ with accumulate) adds its float rows with parallel atomics on
    CPU once a tensor has >= 32768 elements and torch runs > 1 thread, so the sums came out in a varying order."""
    torch.manual_seed(0)
    model = COAPBodyModel(smpl)
    latent = torch.randn(3, 16, 128)
    body = torch.randint(3, (2048,))            # 2048 pairs on 48 (body, part) rows: many repeats per row
    part = torch.randint(16, (2048,))
    local = 0.2 * torch.randn(2048, 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)                    # the atomic path needs > 1 thread (also on a 1-core machine)
    try:
        grads = []
        for _ in range(4):
            model.zero_grad(set_to_none=True)
            pair_logits(model, latent, body, part, local).square().sum().backward()
            grads.append(model.query_encoder.lin0.weight.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_train_coap_is_bit_reproducible(smpl, mocap):
    """Two short trainings with the same seed give bit-identical weights (fp32 and bf16 autocast)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for bf16 in (False, True):
            settings = TrainSettings(iters=4, batch_size=512, pool_bodies=2, box_points=16, surface_points=128,
                                     volume_points=64, eval_bodies=1, eval_points=64, eval_surface_points=64,
                                     bf16=bf16, seed=3)
            first, _ = train_coap(smpl, mocap, settings)
            second, _ = train_coap(smpl, mocap, settings)
            a, b = first.state_dict(), second.state_dict()
            assert a.keys() == b.keys()
            differing = [name for name in a if not torch.equal(a[name], b[name])]
            assert differing == [], f"bf16={bf16}: {differing}"
    finally:
        torch.set_num_threads(threads)


def test_standardised_codes_have_zero_mean_and_unit_within_part_spread():
    torch.manual_seed(0)
    # Features like a random encoder's: a large per-part offset, tiny per-body differences of unequal size.
    features = 0.05 + 0.01 * torch.rand(1, 16, 128) + 1e-3 * (0.2 + torch.rand(128)) * torch.randn(40, 16, 128)
    features[..., 7] = 0.3            # a dimension that never changes must not blow up
    fc_c = torch.nn.Linear(128, 128)
    standardise_codes_(fc_c, features)
    with torch.no_grad():
        codes = fc_c(features)
    expected = (features - features.reshape(-1, 128).mean(0)) / (features - features.mean(0)).reshape(-1, 128).std(0)
    live = torch.arange(128) != 7
    assert torch.allclose(codes[..., live], expected[..., live], atol=1e-3)
    assert torch.allclose(codes.reshape(-1, 128).mean(0)[live], torch.zeros(127), atol=1e-3)
    within = (codes - codes.mean(0)).reshape(-1, 128).std(0)
    assert torch.allclose(within[live], torch.ones(127), atol=1e-3)
    assert bool(torch.isfinite(codes).all()) and codes[..., 7].abs().max() < 0.1


def test_vertex_parts_follow_the_partition(coap, smpl):
    parts = vertex_parts(coap)
    labels = smpl.lbs_weights.numpy().argmax(axis=1)
    merged = {23: 21, 22: 20, 15: 12, 14: 9, 13: 9, 11: 8, 10: 7, 3: 0}
    expected = [PART_JOINTS.index(merged.get(int(j), int(j))) for j in labels]
    assert parts.tolist() == expected


def test_pair_pool_labels_follow_winding_numbers_and_ownership(coap, smpl, mocap):
    from scipy.spatial import cKDTree
    body = pose_bodies(smpl, torch.as_tensor(mocap[:2]), torch.zeros(2, 10))
    settings = TrainSettings(box_points=8, surface_points=256, volume_points=128)
    pool = build_pair_pool(coap, body, faces_of(smpl), settings, torch.Generator().manual_seed(0))
    assert isinstance(pool, PairPool) and pool.features.shape == (2, 16, 128)
    assert len(pool) == len(pool.body) == len(pool.part) == len(pool.local) > 100
    assert 0.1 < pool.target.mean().item() < 0.9
    # Map the pairs back to posed space and recheck every label by brute force.
    with torch.no_grad():
        code = coap.encode_body(body)
    coap.detach_cache()
    frames = torch.linalg.inv(code['bone_trans'])[pool.body, pool.part]                 # [P, 4, 4]
    posed_points = (frames[:, :3, :3] @ pool.local[:, :, None])[..., 0] + frames[:, :3, 3]
    in_box = ((pool.local - code['bbox_center'][pool.body, pool.part, 0]).abs()
              < 0.5 * code['bbox_size'][pool.body, pool.part, 0]).all(-1)
    assert bool(in_box.all())
    parts = vertex_parts(coap)
    for b in range(2):
        mine = pool.body == b
        pts = posed_points[mine]
        inside = torch.from_numpy(inside_mesh(body.vertices[b], faces_of(smpl), pts)).float()
        assert torch.equal(inside, pool.target[mine])
        owner = parts[cKDTree(body.vertices[b].numpy()).query(pts.numpy())[1]]
        positive = pool.target[mine] == 1
        assert torch.equal(owner[positive], pool.part[mine][positive])


def test_train_coap_cli_writes_a_loadable_checkpoint(tmp_path, body_model_dir, smpl, capsys):
    import train_coap
    out = str(tmp_path / 'tiny.ckpt')
    rc = train_coap.main(['--data_dir', body_model_dir, '--out', out, '--iters', '3', '--batch_size', '256',
                          '--pool_bodies', '1', '--eval_bodies', '1', '--half_precision'])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith('IoU ') and 0.0 <= float(last.split()[1]) <= 1.0
    raw = torch.load(out, weights_only=False)
    assert raw['global_step'] == 3 and raw['state_dict']['decoder.lin6.weight'].dtype == torch.float16
    assert raw['state_dict']['encoder.fc_c.weight'].dtype == torch.float32   # codes need full precision
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        attach_coap(create_smpl_like(smpl), checkpoint=out)
    with pytest.raises(SystemExit):
        train_coap.parse_args(['--data_dir', body_model_dir, '--out', out, '--pool_bodies', '0'])
    assert train_coap.main(['--data_dir', str(tmp_path / 'missing'), '--out', out]) == 2


# ----------------------------------------------------------------------------------------------------------------
# A briefly trained model
# ----------------------------------------------------------------------------------------------------------------

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets', 'coap_synthetic_neutral.ckpt')


@pytest.fixture(scope='module')
def trained(smpl):
    """Weights trained by ``train_coap.py --half_precision`` on the seed-0 synthetic body (checked in: training to
    this accuracy takes minutes, not seconds). A warning here means the synthetic body changed: retrain it."""
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        model = attach_coap(create_smpl_like(smpl), checkpoint=ASSET, frozen=True).coap.eval()
    return model, torch.load(ASSET, weights_only=False)['metrics']


def test_trained_weights_separate_inside_from_outside(trained, smpl, mocap):
    model, metrics = trained
    assert 0.90 <= metrics['iou'] <= 1.0   # held-out volumetric IoU recorded by train_coap.py
    body = posed(smpl, mocap[-2:])
    faces = faces_of(smpl)
    gen = torch.Generator().manual_seed(5)
    # Deep inside: bone-axis points of the limbs and torso (winding number 1, at least 2 cm from the surface).
    candidates = body.vertices[:, ::7] + 0.05 * torch.randn(2, (6890 + 6) // 7, 3, generator=gen)
    labels = inside_labels(body.vertices, faces, candidates).bool()
    sd = torch.stack([ExactOccupancy(faces).signed_distance(candidates[b], body.vertices[b]) for b in range(2)])
    deep_in = labels & (sd > 0.02)
    well_out = ~labels & (sd < -0.03)
    torch.manual_seed(0)
    with torch.no_grad():
        occ, extra = model.query(candidates, body, ret_intermediate=True)
        far = model.query(body.vertices[:, :100] + torch.tensor([0.0, 0.0, 1.0]), body)
    in_box_out = well_out & ~extra['all_out']
    assert deep_in.sum() > 50 and in_box_out.sum() > 50
    assert (occ[deep_in] > 0.5).float().mean() > 0.97
    assert (occ[in_box_out] < 0.5).float().mean() > 0.97
    assert bool((far < 0.5).all())
    # The untrained network (IGR sphere of 1 m) calls everything near the body "inside".
    untrained = COAPBodyModel(smpl)
    with torch.no_grad():
        raw = untrained.query(candidates, body)
    assert (raw[in_box_out] < 0.5).float().mean() < 0.5


def test_trained_coap_collision_ratio_agrees_with_exact(trained, smpl, mocap):
    model, _ = trained
    body = posed(smpl, mocap[-4:-2])
    gen = torch.Generator().manual_seed(7)
    lo, hi = body.vertices.min(1, keepdim=True).values, body.vertices.max(1, keepdim=True).values
    crop = lo + torch.rand(2, 4000, 3, generator=gen) * (hi - lo)    # a "scene" filling the body's box
    torch.manual_seed(0)
    with torch.no_grad():
        coap_ratio = (model.query(crop, body) > 0.5).float().mean(1)
        exact_ratio = (ExactOccupancy(faces_of(smpl)).query(crop, body) > 0.5).float().mean(1)
    assert 0.02 < exact_ratio.min() and exact_ratio.max() < 0.6
    assert torch.allclose(coap_ratio, exact_ratio, atol=0.015), (coap_ratio, exact_ratio)
    assert iou(model.query(crop, body) > 0.5, inside_labels(body.vertices, faces_of(smpl), crop)) > 0.85
