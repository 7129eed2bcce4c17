"""Stage-1 network (prohmr_scene/): weights layout, forward pass, camera maths, losses, checkpoints, scripts."""
from __future__ import annotations

import json
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from configs import get_config
from prohmr_scene import losses as L
from prohmr_scene.checkpoints import load_stage1_checkpoint, save_stage1_checkpoint
from utils.checkpoint_io import load_prohmr_backbone
from prohmr_scene.model import ProHMRScene
from utils.body_model import SMPL_TO_OPENPOSE, resolve_data_path
from utils.geometry import aa_to_rotmat, convert_pare_to_full_img_cam, perspective_projection, rotmat_to_aa
from utils.io import DataError
from script_loader import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, 'tests', 'assets', 'manifests')
MANIFEST = os.path.join(SPEC, 'stage1_prohmr_scene.tsv')
FORWARD_IO = os.path.join(SPEC, 'stage1_forward_io.json')
NUM_POINTS = 256


def read_manifest(path):
    entries = {}
    with open(path) as f:
        for line in f:
            if line.startswith('#') or not line.strip():
                continue
            key, shape, dtype, _ = line.rstrip('\n').split('\t')
            entries[key] = (tuple(int(s) for s in shape.split(',')) if shape else (), dtype)
    return entries


def make_cfg(num_test_samples=5):
    return get_config(overrides=['TRAIN.NUM_TEST_SAMPLES', num_test_samples])


@pytest.fixture(scope='module')
def model(body_model_dir):
    torch.manual_seed(0)
    return ProHMRScene(make_cfg(), data_dir=body_model_dir).eval()


def random_batch(bs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    params = {'global_orient': (rand(bs, 3) - 0.5), 'body_pose': 0.3 * (rand(bs, 69) - 0.5),
              'betas': rand(bs, 10) - 0.5, 'transl': torch.tensor([0.1, 0.2, 3.0]) + 0.1 * rand(bs, 3)}
    return {
        'img': torch.randn(bs, 3, 224, 224, generator=g),
        'fx': 1.0 + 0.1 * rand(bs), 'cam_cx': 950 + 20 * rand(bs), 'cam_cy': 530 + 20 * rand(bs),
        'box_center': torch.tensor([800.0, 500.0]) + 300 * rand(bs, 2), 'box_size': 300 + 200 * rand(bs),
        'scene_pcd_verts_full': torch.randn(bs, NUM_POINTS, 3, generator=g) + torch.tensor([0.0, 0.0, 3.0]),
        'smpl_params': params,
        'has_smpl_params': {k: torch.ones(bs, dtype=torch.bool) for k in params},
        'gender': torch.arange(bs) % 2,
        'keypoints_2d': torch.cat([rand(bs, 25, 2) - 0.5, torch.ones(bs, 25, 1)], dim=-1),
        'orig_keypoints_2d': torch.cat([rand(bs, 25, 2) - 0.5, torch.ones(bs, 25, 1)], dim=-1),
        'keypoints_3d': rand(bs, 24, 3), 'keypoints_3d_full': rand(bs, 24, 3) + torch.tensor([0.0, 0.0, 3.0]),
    }


# ------------------------------------------------------------------------------------------------------------------
# weights layout and forward pass
# ------------------------------------------------------------------------------------------------------------------

def test_state_dict_matches_original_manifest(model):
    expected = read_manifest(MANIFEST)
    ours = {k: (tuple(v.shape), str(v.dtype).replace('torch.', '')) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == [] and sorted(set(ours) - set(expected)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
    assert len(ours) == 624


def test_forward_shapes_mode_first_and_shared_shape_camera(model):
    batch = random_batch()
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(batch)
    for key, shape in json.load(open(FORWARD_IO))['output'].items():
        value = out
        for part in key.split('.'):
            value = value[part]
        assert list(value.shape) == shape, key
    with torch.no_grad():
        mode = model.flow(out['conditioning_feats'], 1, noise=torch.zeros(2, 1, 144))
    assert torch.allclose(out['pred_pose_6d'][:, 0], mode['pred_pose_6d'][:, 0], atol=1e-5)
    assert not torch.allclose(out['pred_pose_6d'][:, 1], out['pred_pose_6d'][:, 0], atol=1e-3)
    # betas and camera come from the FC head only: identical for every sample
    assert torch.equal(out['pred_cam'], out['pred_cam'][:, :1].expand_as(out['pred_cam']))
    betas = out['pred_smpl_params']['betas']
    assert torch.equal(betas[:, 1:], betas[:, :1].expand(-1, 4, -1))
    # rotations are proper
    rot = out['pred_smpl_params']['body_pose']
    assert torch.allclose(rot @ rot.transpose(-1, -2), torch.eye(3).expand_as(rot), atol=1e-4)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(rot.shape[:-2]), atol=1e-4)


def test_context_layout(model):
    batch = random_batch()
    with torch.no_grad():
        ctx = model.conditioning(batch)
    f = batch['fx'] * 1500
    expected = torch.stack([batch['cam_cx'] / f, batch['cam_cy'] / f, batch['box_center'][:, 0] / f,
                            batch['box_center'][:, 1] / f, batch['box_size'] / f, batch['fx']], dim=-1)
    assert ctx.shape == (2, 2566)
    assert torch.allclose(ctx[:, :6], expected)


def test_actnorm_data_initialisation_on_first_train_batch(body_model_dir):
    torch.manual_seed(0)
    fresh = ProHMRScene(make_cfg(), data_dir=body_model_dir)
    batch = random_batch(bs=3)
    fresh.eval()
    with torch.no_grad():
        fresh.forward_step(batch)        # eval: sets the top-level flag only, as the original
    assert bool(fresh.initialized) and not any(bool(a.initialized) for a in fresh.flow.flow.actnorms())
    fresh.initialized.fill_(False)
    fresh.train()
    with torch.no_grad():
        context = fresh.conditioning(batch)
        fresh.initialize_actnorm(batch, context)
    assert all(bool(a.initialized) for a in fresh.flow.flow.actnorms())
    first = fresh.flow.flow.actnorms()[0]
    whitened, _ = first(ProHMRScene.gt_pose_6d(batch['smpl_params'])[:, 0])
    varying = ProHMRScene.gt_pose_6d(batch['smpl_params'])[:, 0].std(0) > 1e-3
    assert int(varying.sum()) > 100
    assert torch.allclose(whitened.mean(0)[varying], torch.zeros(int(varying.sum())), atol=1e-3)
    assert torch.allclose(whitened.std(0)[varying], torch.ones(int(varying.sum())), atol=1e-3)


# ------------------------------------------------------------------------------------------------------------------
# camera maths
# ------------------------------------------------------------------------------------------------------------------

def test_crop_camera_translation_reprojects_pelvis_onto_box_centre():
    g = torch.Generator().manual_seed(0)
    n = 6
    box_center = 200 + 1500 * torch.rand(n, 2, generator=g)
    box_size, focal = 150 + 400 * torch.rand(n, generator=g), 1200 + 600 * torch.rand(n, generator=g)
    principal = torch.tensor([960.0, 540.0]) + 40 * torch.rand(n, 2, generator=g)
    scale = 0.5 + torch.rand(n, generator=g)
    for tx_ty in (torch.zeros(n, 2), 0.3 * (torch.rand(n, 2, generator=g) - 0.5)):
        cam = torch.cat([scale[:, None], tx_ty], dim=-1)
        t_full = convert_pare_to_full_img_cam(cam, box_size, box_center, 2 * principal[:, 0], 2 * principal[:, 1],
                                              focal)
        pelvis = torch.zeros(n, 1, 3)                     # SMPL pelvis at the body origin
        uv = perspective_projection(pelvis, t_full, torch.stack([focal, focal], -1), principal)[:, 0]
        # the crop maps [-1, 1] to the box, so a crop offset (tx, ty) moves the pelvis by s*b/2*(tx, ty) pixels
        expected = box_center + (scale * box_size / 2)[:, None] * tx_ty
        assert torch.allclose(uv, expected, atol=1e-3)
        assert torch.allclose(t_full[:, 2], 2 * focal / (scale * box_size))


def test_model_full_translation_and_projections_are_consistent(model):
    batch = random_batch()
    with torch.no_grad():
        out = model(batch)
    f = batch['fx'] * 1500
    t = out['pred_cam_t_full'][:, 0]
    u = f * t[:, 0] / t[:, 2] + batch['cam_cx']           # the body origin's pixel
    s, tx = out['pred_cam'][:, 0, 0], out['pred_cam'][:, 0, 1]
    assert torch.allclose(u, batch['box_center'][:, 0] + s * batch['box_size'] / 2 * tx, atol=1e-2)
    joints = out['pred_keypoints_3d_full'][:, 0]
    proj = f[:, None] * joints[..., 0] / joints[..., 2] + batch['cam_cx'][:, None]
    assert torch.allclose(out['pred_keypoints_2d_full'][:, 0, :, 0], proj / 1920 - 0.5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------------------------

def test_keypoint_2d_loss_hand_value_and_ignored_joints():
    gt = torch.zeros(1, 25, 3)
    gt[..., 2] = 1.0
    gt[0, 3, 2] = 0.5
    pred = torch.zeros(1, 2, 25, 2)
    pred[0, 1, 3] = torch.tensor([0.2, -0.4])             # sample 1, joint 3: |.|_1 = 0.6, conf 0.5
    pred[0, :, 9] = 5.0                                   # right hip: ignored
    loss = L.keypoint_2d_loss(pred, gt)
    assert torch.allclose(loss, torch.tensor([[0.0, 0.3]]))
    mode, exp = L.split_mode_exp(torch.tensor([[1.0, 2.0, 4.0], [3.0, 0.0, 0.0]]))
    assert mode.item() == pytest.approx(2.0) and exp.item() == pytest.approx(1.5)


def test_orthonormality_loss():
    rot = aa_to_rotmat(torch.randn(2, 3, 24, 3))
    six = rot[..., :2].transpose(-1, -2).reshape(2, 3, 144)     # ProHMR layout [c1, c2]
    mode, exp = L.orthonormality_mode_exp(six)
    assert mode.item() < 1e-10 and exp.item() < 1e-10
    six[:, 0, 0:3] *= 2.0                                        # |c1|^2 = 4 for joint 0 of the mode: (4-1)^2 = 9
    mode, _ = L.orthonormality_mode_exp(six)
    assert mode.item() == pytest.approx(2 * 9.0 / (2 * 24 * 4), rel=1e-5)   # both batch items changed
    mode, exp = L.orthonormality_mode_exp(six[:, :1])            # one sample: 0, not the original's NaN
    assert exp.item() == 0.0


def test_compute_loss_uses_the_mode_and_the_right_targets(model):
    batch = random_batch()
    with torch.no_grad():
        out = model(batch)
        # targets made from the model's own mode prediction: those mode terms must vanish
        batch['keypoints_3d_full'] = out['pred_keypoints_3d_full'][:, 0, :24].clone()
        batch['keypoints_3d'] = out['pred_keypoints_3d'][:, 0, :24] + 1.0
        batch['orig_keypoints_2d'][..., :2] = out['pred_keypoints_2d_full'][:, 0, SMPL_TO_OPENPOSE]
        batch['smpl_params']['global_orient'] = rotmat_to_aa(out['pred_smpl_params']['global_orient'][:, 0, 0])
        batch['smpl_params']['betas'] = out['pred_smpl_params']['betas'][:, 0].clone()
        loss, terms = model.compute_loss(batch, out, train=False)
    for name in ('loss_keypoints_3d_full_mode', 'loss_keypoints_3d_mode', 'loss_keypoints_2d_full_mode',
                 'loss_global_orient_mode', 'loss_betas_mode'):
        assert terms[name].item() < 1e-4, name
    assert terms['loss_keypoints_3d_exp'].item() > 1e-3      # the random samples differ from the mode
    assert terms['loss_betas_exp'].item() < 1e-8              # ... but share its betas
    assert torch.isfinite(loss) and loss.item() == pytest.approx(terms['loss'].item())
    with torch.no_grad():
        expected_nll = -model.flow.log_prob(model.gt_pose_6d(batch['smpl_params']), out['conditioning_feats']).mean()
    assert terms['loss_nll'].item() == pytest.approx(expected_nll.item(), rel=1e-5)
    # the crop-2D term is weighted by (1 - with_full_2d_loss) = 0
    batch['keypoints_2d'][..., :2] += 10.0
    with torch.no_grad():
        loss2, _ = model.compute_loss(batch, out, train=False)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)


def test_nll_target_noise_goes_on_the_6d_values(model):
    """Training NLL target = GT in the ProHMR 6D layout + N(0, 0.005^2) drawn as randn_like of global_orient
    [B,1,6], body_pose [B,1,138], betas [B,1,10], in this order (as the original; not noise on axis-angle)."""
    bs = 3000
    g = torch.Generator().manual_seed(4)
    params = {'global_orient': torch.rand(bs, 3, generator=g) - 0.5,
              'body_pose': 0.4 * (torch.rand(bs, 69, generator=g) - 0.5),
              'betas': torch.rand(bs, 10, generator=g) - 0.5}
    clean = model.gt_pose_6d(params)
    assert torch.equal(model._nll_target(params, train=False), clean)
    torch.manual_seed(11)
    noisy = model._nll_target(params, train=True)
    after = torch.randn(1)
    # the same draws by hand
    torch.manual_seed(11)
    orient_noise, pose_noise = torch.randn(bs, 1, 6), torch.randn(bs, 1, 138)
    torch.randn(bs, 1, 10)                                   # betas' draw (the flow sees only the pose)
    torch.testing.assert_close(noisy, clean + 0.005 * torch.cat([orient_noise, pose_noise], dim=-1),
                               rtol=0, atol=1e-6)
    assert torch.equal(torch.randn(1), after)               # nothing else is drawn
    std = (noisy - clean).reshape(bs, 144).std(dim=0)
    assert std.shape == (144,) and torch.all((std - 0.005).abs() < 0.0004), std


def test_discriminator_and_adversarial_terms(model):
    pose = aa_to_rotmat(0.3 * torch.randn(6, 23, 3))
    scores = model.discriminator(pose, torch.randn(6, 10))
    assert scores.shape == (6, 25)
    assert L.adversarial_generator_loss(torch.ones(6, 25), 3).item() == 0.0
    assert L.adversarial_generator_loss(torch.zeros(6, 25), 3).item() == pytest.approx(150 / 3)
    assert L.discriminator_loss(torch.zeros(4, 25), torch.ones(2, 25)).item() == 0.0


# ------------------------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------------------------

def test_stage1_checkpoint_round_trip_drops_neutral_smpl(model, body_model_dir, tmp_path):
    path = str(tmp_path / '123' / 'best_model.pt')
    save_stage1_checkpoint(model, path)
    saved = torch.load(path, weights_only=False)
    assert set(saved) == {'state_dict'} and 'smpl.v_template' in saved['state_dict']
    saved['state_dict']['smpl.v_template'] += 1.0            # must be ignored (the neutral model comes from data_dir)
    saved['state_dict']['smpl_male.v_template'] += 1.0       # must be loaded, as the original does
    torch.save(saved, path)
    torch.manual_seed(5)
    other = ProHMRScene(make_cfg(), data_dir=body_model_dir).eval()
    load_stage1_checkpoint(other, path)
    assert torch.equal(other.smpl.v_template, model.smpl.v_template)
    assert torch.equal(other.smpl_male.v_template, model.smpl_male.v_template + 1.0)
    batch = random_batch()
    outs = []
    for m in (model, other):
        torch.manual_seed(7)
        with torch.no_grad():
            outs.append(m(batch)['pred_vertices'])
    assert torch.equal(outs[0], outs[1])


def test_stage1_checkpoint_errors(model, tmp_path):
    with pytest.raises(DataError, match='missing stage-1 checkpoint'):
        load_stage1_checkpoint(model, str(tmp_path / 'nope.pt'))
    torch.save({'state_dict': {'backbone.conv1.weight': torch.zeros(64, 3, 7, 7)}}, tmp_path / 'partial.pt')
    with pytest.raises(DataError, match='lacks .* network weights'):
        load_stage1_checkpoint(model, str(tmp_path / 'partial.pt'))


def test_prohmr_lightning_checkpoint_with_unimportable_classes(body_model_dir, tmp_path):
    """A Lightning-style file whose callbacks are keyed by a class that cannot be imported at load time."""
    module = types.ModuleType('fake_lightning_callbacks')

    ModelCheckpoint = type('ModelCheckpoint', (), {'__module__': module.__name__})
    module.ModelCheckpoint = ModelCheckpoint
    sys.modules[module.__name__] = module
    torch.manual_seed(3)
    source = ProHMRScene(make_cfg(), data_dir=body_model_dir)
    backbone = {f'backbone.{k}': v.clone() + 0.5 for k, v in source.backbone.state_dict().items()}
    state = dict(backbone)
    state['flow.fc_head.layers.0.weight'] = torch.zeros(1024, 2048)   # ProHMR's context is 2048: skipped
    state['smpl.joint_map'] = torch.zeros(25, dtype=torch.long)
    try:
        torch.save({'state_dict': state, 'callbacks': {ModelCheckpoint: {'best_model_score': 1.0}},
                    'pytorch-lightning_version': '1.4.4'}, tmp_path / 'checkpoint.pt')
    finally:
        del sys.modules[module.__name__]
    target = ProHMRScene(make_cfg(), data_dir=body_model_dir)
    messages = []
    assert load_prohmr_backbone(target, str(tmp_path / 'checkpoint.pt'), log=messages.append) == 318
    assert len(backbone) == 318
    assert torch.equal(target.backbone.conv1.weight, backbone['backbone.conv1.weight'])
    head_before = target.flow.fc_head.layers[0].weight.clone()
    assert load_prohmr_backbone(target, str(tmp_path / 'checkpoint.pt'), only_backbone=False,
                                log=messages.append) == 318
    assert torch.equal(target.flow.fc_head.layers[0].weight, head_before)
    assert any('skipped 1 entries' in m for m in messages)


def test_train_script_missing_prohmr_checkpoint_is_a_one_line_error(body_model_dir, tmp_path, capsys):
    flags = ['--data_dir', body_model_dir, '--checkpoint', str(tmp_path / 'none.pt'),
             '--save_dir', str(tmp_path / 'runs'), '--dataset_root', str(tmp_path)]
    code = load_script('train_prohmr_scene').main(flags)
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert '--load_pretrained False' in err and 'checkpoint.pt' in err


def test_flag_parsing():
    tps, trs = load_script('test_prohmr_scene'), load_script('train_prohmr_scene')
    args = tps.build_parser().parse_args([])
    assert (args.batch_size, args.num_samples, args.save_pred_transl, args.render_multi_sample) == (50, 5, True, True)
    assert tps.build_parser().parse_args(['--save_pred_transl=out/x.pkl']).save_pred_transl == 'out/x.pkl'
    assert tps.build_parser().parse_args(['--save_pred_transl', '0']).save_pred_transl is False
    assert tps.results_path('out/dir', 'o') == os.path.join('out/dir', 'results.pkl')
    targs = trs.build_parser().parse_args(['--do_augment', 'False', '--shuffle', '1'])
    assert (targs.do_augment, targs.shuffle, targs.load_pretrained, targs.val_step, targs.batch_size) == \
        (False, True, True, 2000, 16)


def test_mean_params_path_resolution():
    assert resolve_data_path('data/smpl_mean_params.npz', '/x/d') == os.path.join('/x/d', 'smpl_mean_params.npz')
    assert resolve_data_path('/abs/m.npz', '/x/d') == '/abs/m.npz'


# ------------------------------------------------------------------------------------------------------------------
# end to end on the synthetic world
# ------------------------------------------------------------------------------------------------------------------

def egl_available():
    try:
        from utils.renderer import Renderer
        Renderer(8, 8).close()
    except Exception:
        return False
    return True


@pytest.fixture(scope='module')
def s1_world(synthetic_world, tmp_path_factory):
    """The synthetic world behind a symlinked root, with stage-1 scene crops of 300 points."""
    preprocess_scene_s1 = load_script('preprocess_scene_s1')
    root = str(tmp_path_factory.mktemp('s1_world') / 'egobody')
    os.makedirs(root)
    for entry in os.listdir(synthetic_world.dataset_root):
        os.symlink(os.path.join(synthetic_world.dataset_root, entry), os.path.join(root, entry))
    for split in ('train', 'val', 'test'):
        preprocess_scene_s1.main(['--split', split, '--data_root', root, '--scene_verts_num_target', '300'])
    return types.SimpleNamespace(root=root, data_dir=synthetic_world.data_dir)


def test_train_then_test_end_to_end(s1_world, tmp_path):
    tps, trs = load_script('test_prohmr_scene'), load_script('train_prohmr_scene')
    runs = str(tmp_path / 'runs')
    code = trs.main(['--dataset_root', s1_world.root, '--data_dir', s1_world.data_dir, '--load_pretrained', 'False',
                     '--save_dir', runs, '--run_id', 'e2e', '--batch_size', '2', '--num_workers', '0',
                     '--max_iters', '2', '--val_step', '2', '--log_step', '1', '--seed', '0'])
    assert code == 0
    run_dir = os.path.join(runs, 'e2e')
    assert {'best_model.pt', 'last_model.pt', 'params.json', 'prohmr.yaml'} <= set(os.listdir(run_dir))
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(run_dir))
    curves = json.load(open(os.path.join(run_dir, 'curves.json')))    # what curves.png shows
    assert [step for step, _ in curves['train']['loss']] == [1, 2] and [s for s, _ in curves['val']['loss']] == [2]
    assert open(os.path.join(run_dir, 'curves.png'), 'rb').read(4) == b'\x89PNG'
    state = torch.load(os.path.join(run_dir, 'best_model.pt'), weights_only=False)['state_dict']
    assert bool(state['initialized']) and bool(state['flow.flow._transform._transforms.0.initialized'])

    save_root, render_root = str(tmp_path / 'results'), str(tmp_path / 'render')
    render = (['--render', 'True', '--render_step', '1000', '--output_render_root', render_root]
              if egl_available() else [])
    code = tps.main(['--dataset_root', s1_world.root, '--data_dir', s1_world.data_dir,
                     '--checkpoint', os.path.join(run_dir, 'best_model.pt'), '--save_root', save_root,
                     '--num_workers', '0', '--batch_size', '4', '--num_samples', '2'] + render)
    assert code == 0
    if render:   # batch 0 only: one row per sample plus the all-samples colour row (3 rows of 3 panels), halved
        jpgs = os.listdir(os.path.join(render_root, 'output_prohmr_scene_e2e'))
        assert len(jpgs) == 1 and jpgs[0].startswith('recording_')
        import cv2
        figure = cv2.imread(os.path.join(render_root, 'output_prohmr_scene_e2e', jpgs[0]))
        npz = np.load(os.path.join(s1_world.root, 'annotation_egocentric_smpl_npz', 'egocapture_test_smpl.npz'))
        height, width = cv2.imread(os.path.join(s1_world.root, str(npz['imgname'][0]))).shape[:2]
        assert figure.shape[:2] == (3 * height // 2, 3 * width // 2)
        rows = figure.reshape(3, height // 2, 3, width // 2, 3).astype(int)
        assert np.abs(rows[2, :, 1] - rows[0, :, 1]).max() > 60   # the colour row differs from a pink one
    out_dir = os.path.join(save_root, 'output_prohmr_scene_e2e')
    metrics = json.load(open(os.path.join(out_dir, 'metrics.json')))
    assert set(metrics) == {'G-MPJPE', 'MPJPE', 'PA-MPJPE', 'G-V2V', 'V2V', 'PA-V2V'}
    assert all(np.isfinite(v) and v > 0 for v in metrics.values())
    assert metrics['PA-MPJPE'] <= metrics['MPJPE'] + 1e-6
    with open(os.path.join(out_dir, 'results.pkl'), 'rb') as f:
        results = pickle.load(f)
    npz = np.load(os.path.join(s1_world.root, 'annotation_egocentric_smpl_npz', 'egocapture_test_smpl.npz'))
    assert results['pred_cam_full_list'].dtype == np.float32
    assert results['pred_cam_full_list'].shape == (len(npz['imgname']), 3)
    # every sample of every frame, in test order (utils/predictions.py), and the per-joint plot beside it
    from utils.predictions import load_predictions
    pred = load_predictions(out_dir)
    n = len(npz['imgname'])
    assert str(pred['stage']) == 'prohmr_scene' and list(pred['imgname']) == [str(v) for v in npz['imgname']]
    assert pred['joints'].shape == (n, 2, 24, 3) and pred['vertices'].shape == (n, 2, 6890, 3)
    np.testing.assert_allclose(pred['transl'][:, 0], results['pred_cam_full_list'], atol=1e-5)   # sample 0: mode
    np.testing.assert_allclose(pred['gt_joints'], npz['3d_joints_pv'][:, :24], atol=1e-3)
    u = npz['fx'][:, None] * npz['3d_joints_pv'][:, :24, 0] / npz['3d_joints_pv'][:, :24, 2] + npz['cx'][:, None]
    v = npz['fx'][:, None] * npz['3d_joints_pv'][:, :24, 1] / npz['3d_joints_pv'][:, :24, 2] + npz['cy'][:, None]
    np.testing.assert_array_equal(pred['vis_mask'], (u >= 0) & (u < 1920) & (v >= 0) & (v < 1080))
    assert (~pred['vis_mask']).any()                        # the world guarantees cut frames in the test split
    verts = pred['vertices'].astype(np.float32)         # joints and vertices carry the same translation
    assert np.all(verts.min(axis=2) < pred['joints'][:, :, 0]) and np.all(pred['joints'][:, :, 0] < verts.max(axis=2))
    png = open(os.path.join(out_dir, 'per_joint_errors.png'), 'rb').read(8)
    assert png == b'\x89PNG\r\n\x1a\n'
