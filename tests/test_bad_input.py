"""Broken inputs and interrupted runs (issue 16): each case ends with a non-zero exit and one line naming the file /
key / frame / flag (or succeeds with a warning), is caught before long work starts, and loses nothing.

One tiny world (the session fixture) is shared; each case breaks a copy of one file behind a root of symlinks.
Script cases call the scripts' ``main`` in-process and read the exit code and stderr; a few run as subprocesses.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
import torch

from configs import get_config
from utils import egobody
from utils.io import DataError, atomic_torch_save
from script_loader import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NPZ = egobody.NPZ_FOLDER


SCRIPTS = {}


def script(name):
    if name not in SCRIPTS:
        SCRIPTS[name] = load_script(name)
    return SCRIPTS[name]


def run_main(name, argv, capsys):
    """(exit code, stderr lines) of ``<name>.main(argv)``; ``sys.exit('text')`` counts as code 1 with that text."""
    capsys.readouterr()
    try:
        code = script(name).main(argv)
        code = code if isinstance(code, int) else 0
        extra = []
    except SystemExit as exc:
        code, extra = (1, [exc.code]) if isinstance(exc.code, str) else (exc.code, [])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()] + extra
    return code, err


def shadow(src: str, dst: str, own=()) -> str:
    """A root at ``dst`` whose entries are symlinks into ``src``, except that the folders on the way to each
    relative path in ``own`` are real (so that file can be replaced without touching ``src``)."""
    os.makedirs(dst, exist_ok=True)
    first = {}
    for rel in own:
        head, _, rest = rel.partition('/')
        first.setdefault(head, []).append(rest)
    for entry in os.listdir(src):
        if entry in first and all(first[entry]):
            shadow(os.path.join(src, entry), os.path.join(dst, entry), first[entry])
        elif entry in first and os.path.isfile(os.path.join(src, entry)):
            shutil.copy(os.path.join(src, entry), os.path.join(dst, entry))     # a copy: writing it spares src
        else:
            os.symlink(os.path.join(src, entry), os.path.join(dst, entry))
    return dst


def rewrite_npz(root: str, split: str, **changes) -> str:
    """Replace ``egocapture_<split>_smpl.npz`` in a shadow root by a copy with some keys changed."""
    path = egobody.annotation_npz_path(root, split)
    with np.load(os.path.realpath(path), allow_pickle=True) as archive:
        data = {k: archive[k] for k in archive.files}
    for key, change in changes.items():
        data[key] = change(data[key].copy()) if callable(change) else change
    if os.path.islink(path):
        os.remove(path)
    np.savez(path, **data)
    return path


def npz_root(world, tmp_path, split='test', **changes) -> str:
    root = shadow(world.dataset_root, str(tmp_path / 'root'), [f'{NPZ}/egocapture_{split}_smpl.npz'])
    rewrite_npz(root, split, **changes)
    return root


def one_line(code, err, expected_code, *needles):
    assert code == expected_code, err
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


@pytest.fixture(scope='module')
def world(synthetic_world, tmp_path_factory):
    """The session world behind a root of symlinks, with stage-1 scene crops (300 points) for every split."""
    root = shadow(synthetic_world.dataset_root, str(tmp_path_factory.mktemp('bad_input') / 'egobody'))
    s1_folder = os.path.join(root, egobody.S1_FOLDER)
    if os.path.islink(s1_folder):   # never write into the shared world
        os.remove(s1_folder)
    s1 = load_script('preprocess_scene_s1')
    for split in egobody.SPLITS:
        s1.main(['--split', split, '--data_root', root, '--scene_verts_num_target', '300'])
    npz = np.load(egobody.annotation_npz_path(root, 'test'))
    return types.SimpleNamespace(dataset_root=root, data_dir=synthetic_world.data_dir,
                                 test_imgnames=[str(n) for n in npz['imgname']])


@pytest.fixture(scope='module')
def cfg():
    return get_config()


@pytest.fixture(scope='module')
def checkpoints(world, tmp_path_factory):
    """An untrained stage-1 checkpoint (``s1/best_model.pt``), stage-2 statistics and a zero-weight stage-2 file."""
    from dataloaders.body_rep_stats import save_body_rep_stats
    from prohmr_scene.checkpoints import save_stage1_checkpoint
    from prohmr_scene.model import ProHMRScene
    folder = tmp_path_factory.mktemp('checkpoints')
    torch.manual_seed(0)
    stage1 = str(folder / 's1' / 'best_model.pt')
    save_stage1_checkpoint(ProHMRScene(get_config(), data_dir=world.data_dir), stage1)
    stats = save_body_rep_stats(str(folder / 'stats'), np.zeros(144, np.float32), np.ones(144, np.float32))
    stage2 = str(folder / 's2' / 'best_model_vis.pt')
    atomic_torch_save({'state_dict': {'beta_layer.init_betas': torch.zeros(1, 10)}}, stage2)
    yield types.SimpleNamespace(stage1=stage1, stats=stats, stage2=stage2)
    shutil.rmtree(folder, ignore_errors=True)


def dataset(cfg, root, **kwargs):
    from dataloaders.egobody_dataset import EgoBodyDataset
    return EgoBodyDataset(cfg, root, split=kwargs.pop('split', 'test'), **kwargs)


def data_flags(world, root=None):
    return ['--dataset_root', root or world.dataset_root, '--data_dir', world.data_dir, '--num_workers', '0']


def s2_test_flags(world, checkpoints, tmp_path, *extra):
    return data_flags(world) + ['--checkpoint', checkpoints.stage2, '--stats_path', checkpoints.stats,
                                '--two_stage', 'False', '--scene_crop_by_stage1_transl', 'False',
                                '--with_coap_grad', 'False', '--eval_coll_loss', 'False',
                                '--save_root', str(tmp_path / 'results'), *extra]


def s1_train_flags(world, tmp_path, root=None, *extra):
    return data_flags(world, root) + ['--load_pretrained', 'False', '--save_dir', str(tmp_path / 'runs'),
                                      '--run_id', 'r', '--batch_size', '2', '--max_iters', '1', *extra]


# ------------------------------------------------------------------------------------------------------------------
# 1-10: silent wrong results
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('code', ['male', 'M', 'x'])
def test_01_unknown_gender_code_names_the_frame(world, cfg, tmp_path, code):
    def set_first(g):
        g = g.astype('<U8')
        g[1] = code
        return g
    root = npz_root(world, tmp_path, gender=set_first)
    with pytest.raises(DataError, match="key 'gender' of frame '.*_frame_.*'.*expected 'm' or 'f'"):
        dataset(cfg, root)


def test_02_stage1_checkpoint_refused_by_the_stage2_test(world, checkpoints, tmp_path, capsys):
    argv = s2_test_flags(world, checkpoints, tmp_path)
    argv[argv.index('--checkpoint') + 1] = checkpoints.stage1
    code, err = run_main('test_egohmr', argv, capsys)
    one_line(code, err, 1, checkpoints.stage1, "denoiser's weights", 'test_prohmr_scene.py')
    assert not os.path.exists(tmp_path / 'results' / 's1')


def test_03_nan_pose_stops_stage1_training_before_a_run_folder(world, tmp_path, capsys):
    def nan_row(pose):
        pose[2, 5] = np.nan
        return pose
    root = npz_root(world, tmp_path, split='train', pose=nan_row)
    code, err = run_main('train_prohmr_scene', s1_train_flags(world, tmp_path, root), capsys)
    one_line(code, err, 1, 'egocapture_train_smpl.npz', "key 'pose'", 'frame 2')
    assert not os.path.exists(tmp_path / 'runs' / 'r')


def test_03_non_finite_loss_stops_before_the_optimizer_step():
    from prohmr_scene.trainer import train_step

    class NaNModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))
            self.cfg = types.SimpleNamespace(LOSS_WEIGHTS=types.SimpleNamespace(ADVERSARIAL=0.1))

        def forward_step(self, batch, train):
            return {'x': self.weight * float('nan')}

        def compute_loss(self, batch, output, train):
            return output['x'].sum(), {'loss_keypoints_3d': output['x'].sum()}

        def adversarial_loss(self, output):
            return self.weight.sum()

    model = NaNModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(FloatingPointError, match=r'non-finite training loss \(loss, loss_keypoints_3d\); stopped '
                                                 r'before the optimizer step'):
        train_step(model, {}, {}, optimizer, optimizer)
    assert torch.equal(model.weight.detach(), torch.ones(1))


def test_03_non_finite_loss_stops_stage2_before_the_optimizer_step():
    from egohmr.trainer import train_step

    class NaNDenoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))

        def x_start_from_smpl_params(self, params):
            return torch.zeros(2, 144)

        def forward(self, batch, t, x_t=None):
            nan = self.weight * float('nan')
            return {'losses': {'loss_v2v': nan.sum()}, 'x': nan}

        def compute_loss(self, batch, output, cur_epoch):
            return output['x'].sum()

    diffusion = types.SimpleNamespace(q_sample=lambda x, t, noise: x + noise)
    sampler = types.SimpleNamespace(sample=lambda bs, device: (torch.zeros(bs, dtype=torch.long), None))
    model = NaNDenoiser()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(FloatingPointError, match=r'non-finite training loss \(loss, loss_v2v\)'):
        train_step(model, diffusion, sampler, {'img': torch.zeros(2, 3, 4, 4), 'smpl_params': {}}, optimizer, 0)
    assert torch.equal(model.weight.detach(), torch.ones(1))


def test_04_truncated_jpeg_names_the_image(world, cfg, tmp_path):
    rel = world.test_imgnames[0]
    root = shadow(world.dataset_root, str(tmp_path / 'root'), [rel])
    original = os.path.join(world.dataset_root, rel)
    with open(original, 'rb') as f:
        data = f.read()
    with open(os.path.join(root, rel), 'wb') as f:
        f.write(data[:len(data) // 2])
    items = dataset(cfg, root)
    items.get_item(1)  # complete images still load
    with pytest.raises(DataError, match=r"image '.*PV.*\.jpg' is truncated"):
        items.get_item(0)


def test_05_cut_short_scene_mesh_is_refused(world, tmp_path):
    from dataloaders.scene_preprocess import read_obj_vertices
    mesh_dir = os.path.join(world.dataset_root, 'scene_mesh')
    scene = sorted(os.listdir(mesh_dir))[0]
    with open(os.path.join(mesh_dir, scene, f'{scene}.obj'), 'rb') as f:
        data = f.read()
    whole = tmp_path / 'whole.obj'
    whole.write_bytes(data)
    assert len(read_obj_vertices(str(whole))) > 0
    cut = tmp_path / 'cut.obj'
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.obj' ends in the middle of a line: the file is cut short"):
        read_obj_vertices(str(cut))
    lost = tmp_path / 'lost_vertices.obj'   # cut at a line end, faces kept: the faces name missing vertices
    lost.write_bytes(b'v 0 0 0\nv 1 0 0\nf 1 2 3\n')
    with pytest.raises(DataError, match="faces using vertex 3 but only 2 vertices"):
        read_obj_vertices(str(lost))


def corrupt_inside_zip(src: str, dst: str) -> None:
    """Copy ``src`` and flip one byte inside the largest stored tensor record (the zip structure stays valid)."""
    with zipfile.ZipFile(src) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with open(src, 'rb') as f:
        data = bytearray(f.read())
    start = info.header_offset + 30 + len(info.filename.encode()) + int.from_bytes(
        data[info.header_offset + 28:info.header_offset + 30], 'little')
    data[start + info.file_size // 2] ^= 0xFF
    with open(dst, 'wb') as f:
        f.write(bytes(data))


def test_06_corrupted_or_nan_checkpoint_names_the_file(world, cfg, checkpoints, tmp_path):
    from prohmr_scene.checkpoints import load_stage1_checkpoint
    from prohmr_scene.model import ProHMRScene
    model = ProHMRScene(cfg, data_dir=world.data_dir)
    bad = str(tmp_path / 'damaged' / 'best_model.pt')
    os.makedirs(os.path.dirname(bad))
    corrupt_inside_zip(checkpoints.stage1, bad)
    with pytest.raises(DataError, match=r"damaged/best_model\.pt' is damaged: entry '.*' fails its CRC check"):
        load_stage1_checkpoint(model, bad)
    state = torch.load(checkpoints.stage1, weights_only=False)['state_dict']
    key = next(k for k in state if k.startswith('flow.') and state[k].is_floating_point())
    state[key] = torch.full_like(state[key], float('nan'))
    nan_path = str(tmp_path / 'nan.pt')
    torch.save({'state_dict': state}, nan_path)
    with pytest.raises(DataError, match=f"nan.pt' entry '{key}' has non-finite values"):
        load_stage1_checkpoint(model, nan_path)


def test_07_val_at_start_never_writes_best_model(world, cfg, tmp_path, monkeypatch):
    import prohmr_scene.trainer as trainer
    calls = []
    monkeypatch.setattr(trainer, 'validate', lambda model, loader, device: {trainer.VAL_METRIC: 1.0})
    monkeypatch.setattr(trainer, 'data_initialize', lambda model, batch: None)

    def no_training(args, loader, sampler, step_fn, validate, record, writer, *rest, **kwargs):
        calls.append(kwargs)
        if writer is not None:      # as the real loop: its TensorBoard thread must not outlive tmp_path
            writer.close()
        return 0
    monkeypatch.setattr(trainer, 'run_training_loop', no_training)
    args = script('train_prohmr_scene').build_parser().parse_args(
        s1_train_flags(world, tmp_path) + ['--val_at_start', 'True', '--seed', '0'])
    summary = trainer.train(args, cfg)
    assert calls and [h['iteration'] for h in summary['val_history']] == [0]
    assert not os.path.exists(os.path.join(summary['run_dir'], 'best_model.pt'))


@pytest.mark.parametrize('name, argv, needle', [
    ('test_egohmr', ['--samples_per_chain', '-1'], '--samples_per_chain must be >= 0'),
    ('train_prohmr_scene', ['--max_iters', '-3'], '--max_iters must be >= 1, got -3'),
    ('train_egohmr', ['--max_iters', '0'], '--max_iters must be >= 1, got 0'),
    ('test_egohmr', ['--cond_grad_weight', 'nan'], '--cond_grad_weight must be a finite number'),   # 14
    ('train_egohmr', ['--cond_mask_prob', 'inf'], '--cond_mask_prob must be a finite number'),      # 14
])
def test_08_14_bad_flag_values(name, argv, needle, tmp_path, capsys):
    code, err = run_main(name, argv + ['--save_dir' if name.startswith('train') else '--save_root',
                                       str(tmp_path / 'out')], capsys)
    one_line(code, err, 2, needle)
    assert not os.path.exists(tmp_path / 'out')


def test_09_stage2_runs_with_another_sampler_do_not_overwrite(world, checkpoints, tmp_path, capsys):
    metrics = tmp_path / 'results' / 'output_egohmr_s2' / 'metrics.json'
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({'G-MPJPE': 1.0, 'sampling': 'ddim5', 'guidance': False}))
    code, err = run_main('test_egohmr', s2_test_flags(world, checkpoints, tmp_path,
                                                       '--timestep_respacing_eval', 'ddpm'), capsys)
    one_line(code, err, 2, str(metrics), 'ddim5 run', 'another --save_root')
    assert json.loads(metrics.read_text())['G-MPJPE'] == 1.0


@pytest.mark.parametrize('flag, value, needle', [
    ('--coap_checkpoint', 'missing.ckpt', '--coap_checkpoint: no COAP checkpoint'),
    ('--dataset_root', 'no_such_root', 'missing'),                                     # 25
])
def test_10_25_failed_start_writes_nothing(world, tmp_path, capsys, flag, value, needle):
    argv = data_flags(world) + ['--load_pretrained_img_enc', 'False', '--save_dir', str(tmp_path / 'runs'),
                                '--run_id', 'r', '--batch_size', '2', '--max_iters', '1']
    argv += [flag, str(tmp_path / value)]
    code, err = run_main('train_egohmr', argv, capsys)
    one_line(code, err, 1, needle, value)
    assert not os.path.exists(tmp_path / 'runs' / 'r')


# ------------------------------------------------------------------------------------------------------------------
# 11-22: crashes deep inside a library, or the wrong cause named
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('short', ['all', 'v_template'])
def test_11_smpl_file_of_another_vertex_count(world, tmp_path, short):
    from utils.body_model import create_smpl
    src = os.path.join(world.data_dir, 'smpl', 'smpl', 'SMPL_NEUTRAL.pkl')
    with open(src, 'rb') as f:
        data = pickle.load(f, encoding='latin1')
    keys = ['v_template'] if short == 'v_template' else ['v_template', 'weights', 'shapedirs', 'posedirs']
    for key in keys:
        data[key] = data[key][:6000]
    if short == 'all':
        data['J_regressor'] = data['J_regressor'][:, :6000]
        data['f'] = data['f'][(data['f'] < 6000).all(axis=1)]
    folder = tmp_path / 'data' / 'smpl' / 'smpl'
    folder.mkdir(parents=True)
    with open(folder / 'SMPL_NEUTRAL.pkl', 'wb') as f:
        pickle.dump(data, f, protocol=2)
    with pytest.raises(DataError, match=r"SMPL_NEUTRAL\.pkl' key 'v_template' has shape \[6000, 3\], expected "
                                        r"\[6890,3\]"):
        create_smpl(str(tmp_path / 'data'), 'neutral')


def test_12_calibration_of_the_wrong_shape(world, cfg, tmp_path):
    recording = world.test_imgnames[0].split('/')[-4]
    scene = egobody.scene_of(world.dataset_root, recording)
    rel = os.path.relpath(egobody.kinect_to_scene_path(world.dataset_root, recording, scene), world.dataset_root)
    root = shadow(world.dataset_root, str(tmp_path / 'root'), [rel])
    with open(os.path.join(root, rel), 'w') as f:
        json.dump({'trans': np.eye(4)[:2, :3].tolist()}, f)
    with pytest.raises(DataError, match=r"calibration '.*json' key 'trans' has shape \[2, 3\], expected \[4, 4\]"):
        dataset(cfg, root, scene_type='cube', cube_root=str(tmp_path))


def test_13_nan_translation_in_the_test_npz(world, cfg, tmp_path):
    def nan_row(transl):
        transl[3] = np.nan
        return transl
    root = npz_root(world, tmp_path, transl_pv=nan_row)
    with pytest.raises(DataError, match=rf"key 'transl_pv' has non-finite values \(NaN/inf\) at frame 3 "
                                        rf"\('{world.test_imgnames[3]}'\)"):
        dataset(cfg, root)


@pytest.mark.parametrize('name, cube', [('preprocess_scene_s2_for_train', '-2'),
                                        ('preprocess_scene_s2_for_test', '0')])
def test_15_non_positive_cube_size(world, tmp_path, capsys, name, cube):
    code, err = run_main(name, ['--data_root', world.dataset_root, '--data_dir', world.data_dir,
                                '--save_root', str(tmp_path / 'out'), '--cube_size', cube], capsys)
    one_line(code, err, 2, f'--cube_size must be > 0 (metres), got {float(cube)}')
    assert not os.path.exists(tmp_path / 'out')


def test_15_body_wider_than_the_cube_centres_the_crop(caplog):
    from dataloaders import scene_preprocess as sp
    body = np.array([[-1.1, 0.0, 0.0], [1.1, 0.0, 0.0], [0.0, 1.7, 0.1]])
    centre = body.mean(axis=0)
    with caplog.at_level(logging.WARNING):
        theta, shift = sp.draw_cube_yaw_and_shift(sp.frame_rng(0, 4), body, centre, 0.4, what='frame_x')
    assert 'frame_x: the body is wider than --cube_size 0.4' in caplog.text
    (x_low, x_high), (z_low, z_high) = sp.cube_shift_bounds(body, centre, theta, 0.4)
    for value, low, high in zip(shift, (x_low, z_low), (x_high, z_high)):
        assert min(low, high) <= value <= max(low, high)
    # a body that fits keeps the original draw (same numbers as before this check)
    small = 0.1 * body
    rng = sp.frame_rng(0, 4)
    theta2, shift2 = sp.draw_cube_yaw_and_shift(sp.frame_rng(0, 4), small, small.mean(axis=0), 2.0)
    assert theta2 == float(rng.uniform(0.0, 2.0 * np.pi))
    (lx, hx), _ = sp.cube_shift_bounds(small, small.mean(axis=0), theta2, 2.0)
    assert shift2[0] == float(rng.uniform(lx, hx))


@pytest.mark.parametrize('target', ['0', '-5'])
def test_16_scene_verts_num_target_checked_first(world, tmp_path, capsys, target):
    code, err = run_main('preprocess_scene_s1', ['--data_root', world.dataset_root, '--save_root',
                                                 str(tmp_path / 'out'), '--scene_verts_num_target', target], capsys)
    one_line(code, err, 2, f'--scene_verts_num_target must be >= 1, got {target}')
    assert not os.path.exists(tmp_path / 'out')


def test_17_pose_with_fewer_rows_than_imgname(world, tmp_path, capsys):
    root = npz_root(world, tmp_path, split='train', pose=lambda pose: pose[:-2])
    code, err = run_main('preprocess_scene_s2_for_train', ['--data_root', root, '--data_dir', world.data_dir,
                                                           '--save_root', str(tmp_path / 'out')], capsys)
    one_line(code, err, 1, "egocapture_train_smpl.npz' key 'pose' has 4 rows, expected 6 (as 'imgname')")
    assert not os.path.exists(tmp_path / 'out')


def test_18_nan_row_in_stage1_results(world, tmp_path, capsys):
    rows = np.zeros((len(world.test_imgnames), 3), np.float32) + [0.0, 0.0, 3.0]
    rows[2, 1] = np.nan
    results = tmp_path / 'results.pkl'
    with open(results, 'wb') as f:
        pickle.dump({'pred_cam_full_list': rows}, f)
    code, err = run_main('preprocess_scene_s2_for_test', ['--data_root', world.dataset_root, '--save_root',
                                                          str(tmp_path / 'out'), '--stage1_result_path',
                                                          str(results)], capsys)
    one_line(code, err, 1, str(results), "'pred_cam_full_list' has non-finite values", 'frame 2')
    assert not os.path.exists(tmp_path / 'out')


def test_19_empty_test_split(world, checkpoints, tmp_path, capsys):
    root = npz_root(world, tmp_path)
    path = egobody.annotation_npz_path(root, 'test')
    with np.load(path) as archive:
        empty = {k: archive[k][:0] for k in archive.files}
    np.savez(path, **empty)
    code, err = run_main('test_prohmr_scene', data_flags(world, root) + [
        '--checkpoint', checkpoints.stage1, '--save_root', str(tmp_path / 'out')], capsys)
    one_line(code, err, 1, 'the test split is empty', 'egocapture_test_smpl.npz')
    assert not os.path.exists(tmp_path / 'out')


def test_20_truncated_cube_npy_and_coap_checkpoint(world, cfg, tmp_path):
    from egohmr.coap.checkpoint import read_checkpoint_file
    recording, date, frame = egobody.parse_imgname(world.test_imgnames[0])
    cube = tmp_path / 'cubes' / 'test' / recording / date / f'{frame}.npy'
    cube.parent.mkdir(parents=True)
    np.save(cube, np.zeros((300, 3)))
    cube.write_bytes(cube.read_bytes()[:1000])
    items = dataset(cfg, world.dataset_root, scene_type='cube', cube_root=str(tmp_path / 'cubes'))
    with pytest.raises(DataError, match=rf"cannot read scene cube crop '.*{frame}\.npy' \(truncated"):
        items.scene_points_pv(0)
    asset = os.path.join(ROOT, 'tests', 'assets', 'coap_synthetic_neutral.ckpt')
    with open(asset, 'rb') as f:
        data = f.read()
    cut = tmp_path / 'coap.ckpt'
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"COAP checkpoint '.*coap\.ckpt'"):
        read_checkpoint_file(str(cut))


class _FailingItems(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        raise DataError("cannot read image 'x/PV/f.jpg' (missing or not an image)")


def test_21_missing_image_found_up_front_and_worker_errors_are_one_line(world, cfg, tmp_path):
    from utils.checks import error_line
    rel = world.test_imgnames[4]
    root = shadow(world.dataset_root, str(tmp_path / 'root'), [rel])
    os.remove(os.path.join(root, rel))
    with pytest.raises(DataError, match=rf"missing image '.*{os.path.basename(rel)}'.*1 of 6 images"):
        dataset(cfg, root)
    loader = torch.utils.data.DataLoader(_FailingItems(), batch_size=2, num_workers=1)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    assert len(str(info.value).splitlines()) > 3   # torch's wrapped traceback
    assert error_line(info.value) == "cannot read image 'x/PV/f.jpg' (missing or not an image)"


def test_22_checkpoint_typo_names_the_checkpoint(world, checkpoints, tmp_path, capsys):
    argv = s2_test_flags(world, checkpoints, tmp_path)
    argv[argv.index('--checkpoint') + 1] = checkpoints.stage2 + 'x'
    argv.remove('--stats_path')
    argv.remove(checkpoints.stats)
    code, err = run_main('test_egohmr', argv, capsys)
    one_line(code, err, 2, f"--checkpoint: no stage-2 checkpoint at '{checkpoints.stage2}x'")


# ------------------------------------------------------------------------------------------------------------------
# 23-26: work lost at the end
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['test_prohmr_scene', 'test_egohmr', 'preprocess_scene_s1', 'train_prohmr_scene',
                                  'train_coap'])
def test_23_output_path_under_a_file_is_refused_first(world, checkpoints, tmp_path, capsys, name):
    blocker = tmp_path / 'file'
    blocker.write_text('keep me')
    argv = {
        'test_prohmr_scene': data_flags(world) + ['--checkpoint', checkpoints.stage1, '--save_root', str(blocker)],
        'test_egohmr': s2_test_flags(world, checkpoints, tmp_path)[:-1] + [str(blocker)],
        'preprocess_scene_s1': ['--data_root', world.dataset_root, '--save_root', str(blocker)],
        'train_prohmr_scene': data_flags(world) + ['--load_pretrained', 'False', '--save_dir', str(blocker / 'runs'),
                                                   '--batch_size', '2'],
        'train_coap': ['--data_dir', world.data_dir, '--out', str(blocker / 'coap.ckpt'), '--iters', '1'],
    }[name]
    code, err = run_main(name, argv, capsys)
    expected_code = 1 if name == 'train_prohmr_scene' else 2
    one_line(code, err, expected_code, str(blocker), 'must be a folder, but a file is in the way')
    assert blocker.read_text() == 'keep me'


SIGTERM_DURING_SAVE = r'''
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from utils.io import atomic_path
with atomic_path(sys.argv[2]) as tmp:
    with open(tmp, 'wb') as f:
        f.write(b'half a checkpoint')
    os.kill(os.getpid(), signal.SIGTERM)
'''


def test_24_sigterm_during_a_save_leaves_no_temporary_and_keeps_the_old_file(tmp_path):
    target = tmp_path / 'last_model.pt'
    target.write_bytes(b'complete old checkpoint')
    proc = subprocess.run([sys.executable, '-c', SIGTERM_DURING_SAVE, ROOT, str(target)], capture_output=True)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert os.listdir(tmp_path) == ['last_model.pt']
    assert target.read_bytes() == b'complete old checkpoint'


def test_24_temporaries_of_a_killed_process_are_removed_by_the_next_save(tmp_path):
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    stale = tmp_path / f'.last_model.pt.{int(dead.stdout)}.a1b2c3d4.tmp'
    stale.mkdir()
    (stale / 'last_model.pt').write_bytes(b'x' * 1000)
    other = tmp_path / f'.best_model.pt.{int(dead.stdout)}.a1b2c3d4.tmp'   # another file's: not ours to remove
    other.mkdir()
    atomic_torch_save({'a': torch.ones(2)}, str(tmp_path / 'last_model.pt'))
    assert sorted(os.listdir(tmp_path)) == [other.name, 'last_model.pt']


def test_26_equal_saves_give_equal_checkpoint_bytes(tmp_path):
    state = {'state_dict': {'w': torch.arange(6.0).reshape(2, 3)}}
    paths = [tmp_path / run / 'last_model.pt' for run in ('a', 'b')]
    for path in paths:
        atomic_torch_save(state, str(path))
    torch.save(state, str(tmp_path / 'last_model.pt'))
    assert paths[0].read_bytes() == paths[1].read_bytes() == (tmp_path / 'last_model.pt').read_bytes()
    with zipfile.ZipFile(paths[0]) as archive:
        assert {name.split('/')[0] for name in archive.namelist()} == {'last_model'}


def test_script_level_errors_are_one_line_in_a_subprocess(world, tmp_path):
    """Two representative cases end to end, as a user sees them: exit code and the single stderr line."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'preprocess_scene_s1.py'), '--data_root',
                           world.dataset_root, '--save_root', str(tmp_path / 'o'), '--scene_verts_num_target', '0'],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        'error: --scene_verts_num_target must be >= 1, got 0']
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'train_egohmr.py')] + data_flags(world) +
                          ['--load_pretrained_img_enc', 'False', '--save_dir', str(tmp_path / 'runs'),
                           '--weight_loss_v2v', 'nan'],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ['error: --weight_loss_v2v must be a finite number, got nan']
    assert not os.path.exists(tmp_path / 'runs')
