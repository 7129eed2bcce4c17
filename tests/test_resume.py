"""Runs that survive: exact resume (both stages), no silent overwrite, SIGTERM saves and --resume continues.

Each case trains a few iterations on the tiny synthetic world (batch 2, a few hundred scene points) and compares the
final weights bit for bit with an uninterrupted run of the same length.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from script_loader import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def linked_root(synthetic_world, folder):
    root = str(folder / 'egobody')
    os.makedirs(root)
    for entry in os.listdir(synthetic_world.dataset_root):
        os.symlink(os.path.join(synthetic_world.dataset_root, entry), os.path.join(root, entry))
    return root


@pytest.fixture(scope='module')
def world(synthetic_world, tmp_path_factory):
    """The tiny world with stage-1 crops (300 points) and stage-2 GT cubes for train and val."""
    root = linked_root(synthetic_world, tmp_path_factory.mktemp('resume_world'))
    s1, s2 = load_script('preprocess_scene_s1'), load_script('preprocess_scene_s2_for_train')
    for split in ('train', 'val'):
        s1.main(['--split', split, '--data_root', root, '--scene_verts_num_target', '300'])
        s2.main(['--split', split, '--data_root', root, '--data_dir', synthetic_world.data_dir, '--seed', '0'])
    return types.SimpleNamespace(root=root, data_dir=synthetic_world.data_dir)


STAGES = {
    'stage1': ('train_prohmr_scene', ['--load_pretrained', 'False'], 'last_model.pt'),
    'stage2': ('train_egohmr', ['--load_pretrained_img_enc', 'False', '--weight_coap_penetration', '0',
                                '--eval_spacing', '1', '--scene_downsample_rate', '8'], 'last_model.pt'),
}


def flags(world, stage, runs, run_id, iters, workers=0, extra=()):
    _, stage_flags, _ = STAGES[stage]
    return ['--dataset_root', world.root, '--data_dir', world.data_dir, '--save_dir', str(runs), '--run_id', run_id,
            '--batch_size', '2', '--num_workers', str(workers), '--max_iters', str(iters), '--val_step', '2',
            '--log_step', '1', '--save_step', '100', '--seed', '0', *stage_flags, *extra]


def weights(path):
    return torch.load(path, map_location='cpu', weights_only=False)['state_dict']


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize('stage,workers', [('stage1', 0), ('stage2', 0), ('stage2', 2)])
def test_stop_and_resume_gives_the_uninterrupted_weights(world, tmp_path, stage, workers):
    script = load_script(STAGES[stage][0])
    runs = tmp_path / 'runs'
    assert script.main(flags(world, stage, runs, 'full', 2, workers)) == 0
    assert script.main(flags(world, stage, runs, 'part', 1, workers)) == 0
    part = weights(runs / 'part' / 'last_model.pt')
    assert script.main(flags(world, stage, runs, 'part', 2, workers, ['--resume', str(runs / 'part')])) == 0
    state = torch.load(runs / 'part' / 'last_model.pt', map_location='cpu', weights_only=False)
    assert state['iteration'] == 2 and state['format_version'] == 1 and state['config']['data_seed'] == 0
    full = weights(runs / 'full' / 'last_model.pt')
    assert_same_weights(state['state_dict'], full)
    assert any(not torch.equal(part[k], full[k]) for k in full)      # the resumed iterations did train


def test_checkpoint_holds_the_run(world, tmp_path):
    script = load_script('train_egohmr')
    assert script.main(flags(world, 'stage2', tmp_path, 'r', 2)) == 0
    state = torch.load(tmp_path / 'r' / 'last_model.pt', map_location='cpu', weights_only=False)
    assert {'state_dict', 'config', 'optimizers', 'iteration', 'epoch', 'best', 'rng', 'body_rep_stats'} <= set(state)
    assert state['config']['stage'] == 'egohmr' and state['config']['args']['scene_cano'] is True
    assert 'LOSS_WEIGHTS' in state['config']['model_cfg']
    assert state['body_rep_stats']['Xmean'].shape == (144,)
    best = torch.load(tmp_path / 'r' / 'best_model_vis.pt', map_location='cpu', weights_only=False)
    assert best['iteration'] == 2 and best['best'] == pytest.approx(state['best'])


def test_existing_run_is_refused_without_resume_or_overwrite(world, tmp_path, capsys):
    script = load_script('train_prohmr_scene')
    assert script.main(flags(world, 'stage1', tmp_path, 'same', 1)) == 0
    before = weights(tmp_path / 'same' / 'last_model.pt')
    capsys.readouterr()
    assert script.main(flags(world, 'stage1', tmp_path, 'same', 1)) == 1
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and 'already holds' in err and '--resume' in err and 'same' in err
    assert_same_weights(weights(tmp_path / 'same' / 'last_model.pt'), before)
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()                                        # a pid that no longer runs: its save was interrupted
    stale = tmp_path / 'same' / f'.last_model.pt.{dead.pid}.abcd1234.tmp'
    stale.mkdir()
    (stale / 'last_model.pt').write_bytes(b'half a checkpoint')
    assert script.main(flags(world, 'stage1', tmp_path, 'same', 1, extra=['--overwrite', 'True'])) == 0
    assert not stale.exists()
    assert script.main(['--resume', str(tmp_path / 'nothing_here'), *flags(world, 'stage1', tmp_path, 'x', 1)]) == 1
    assert '--resume' in capsys.readouterr().err


def test_sigterm_saves_last_model_and_resume_continues(world, tmp_path):
    """A real SIGTERM mid-run: the run saves last_model.pt at the iteration it reached and exits; --resume then
    finishes the run with the weights of an uninterrupted one."""
    runs = tmp_path / 'runs'
    cmd = [sys.executable, os.path.join(ROOT, 'train_egohmr.py'), *flags(world, 'stage2', runs, 'sig', 40)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, log = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        logs = [f for f in os.listdir(runs / 'sig')] if (runs / 'sig').is_dir() else []
        log = next((runs / 'sig' / f for f in logs if f.startswith('run_') and f.endswith('.log')), None)
        if log is not None and '[train] iter 1 ' in log.read_text():
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-2000:]
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, output[-2000:]
    assert 'interrupted: stopped by SIGTERM' in output
    reached = torch.load(runs / 'sig' / 'last_model.pt', map_location='cpu', weights_only=False)['iteration']
    assert 1 <= reached < 40
    script = load_script('train_egohmr')
    target = reached + 1
    assert script.main(flags(world, 'stage2', runs, 'sig', target, extra=['--resume', str(runs / 'sig')])) == 0
    assert script.main(flags(world, 'stage2', runs, 'straight', target)) == 0
    assert_same_weights(weights(runs / 'sig' / 'last_model.pt'), weights(runs / 'straight' / 'last_model.pt'))


def test_test_script_takes_run_settings_from_the_checkpoint(tmp_path, capsys):
    """test_egohmr.py: a flag left at its default takes the training run's value (with a note); a flag that
    contradicts the checkpoint stops with one line naming both values; a weights-only file changes nothing."""
    from utils.io import DataError
    from utils.run_state import STAGE2_RUN_SETTINGS, apply_run_settings
    script = load_script('test_egohmr')
    parser = script.build_parser()
    path = str(tmp_path / 'best_model_vis.pt')
    torch.save({'state_dict': {}, 'config': {'args': {'scene_downsample_rate': 8, 'scene_cano': True}}}, path)
    argv = ['--checkpoint', path]
    args = parser.parse_args(argv)
    apply_run_settings(args, parser, argv, path, STAGE2_RUN_SETTINGS)
    assert args.scene_downsample_rate == 8 and args.scene_cano is True
    assert 'scene_downsample_rate 8' in capsys.readouterr().out
    for argv in (['--checkpoint', path, '--scene_cano', 'False'], ['--checkpoint', path, '--scene_cano=False']):
        args = parser.parse_args(argv)
        with pytest.raises(DataError, match='contradicts the checkpoint') as err:
            apply_run_settings(args, parser, argv, path, STAGE2_RUN_SETTINGS)
        assert '\n' not in str(err.value)
    assert script.main(['--checkpoint', path, '--scene_cano', 'False', '--two_stage', 'False']) == 2
    assert 'trained with --scene_cano True' in capsys.readouterr().err
    # the scene point density may change at test time (all 20000 points for a collision check): a warning
    argv = ['--checkpoint', path, '--scene_downsample_rate', '1']
    args = parser.parse_args(argv)
    apply_run_settings(args, parser, argv, path, STAGE2_RUN_SETTINGS)
    assert args.scene_downsample_rate == 1 and 'warning: --scene_downsample_rate 1 differs' in capsys.readouterr().out
    released = str(tmp_path / 'released.pt')
    torch.save({'state_dict': {}}, released)
    argv = ['--checkpoint', released, '--scene_downsample_rate', '2']
    args = parser.parse_args(argv)
    apply_run_settings(args, parser, argv, released, STAGE2_RUN_SETTINGS)
    assert args.scene_downsample_rate == 2


def torchrun(args, timeout=600):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *args]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def run_log(run_dir):
    return ''.join(open(os.path.join(run_dir, f)).read() for f in sorted(os.listdir(run_dir)) if f.endswith('.log'))


@pytest.mark.parametrize('stage', ['stage1', 'stage2'])
def test_two_gloo_processes_stay_in_step_and_resume_exactly(world, tmp_path, stage):
    """torchrun with 2 CPU processes (gloo): both ranks hold identical weights after every step (checked by the
    trainer each --log_step), rank 0 writes the checkpoints, and (stage 2) a run stopped and resumed under torchrun
    ends with the weights of an uninterrupted one."""
    script, _, _ = STAGES[stage]
    runs = tmp_path / 'runs'
    torchrun([f'{script}.py', *flags(world, stage, runs, 'full', 2), '--device', 'cpu'])
    log = run_log(runs / 'full')
    assert log.count('[ddp] 2 ranks hold identical weights') == 2 and '2 processes' in log
    state = torch.load(runs / 'full' / 'last_model.pt', map_location='cpu', weights_only=False)
    assert state['iteration'] == 2 and len(state['rng_per_rank']) == 2
    if stage == 'stage1':
        return
    from egohmr.checkpoints import load_egohmr_weights
    from egohmr.model import EgoHMR
    from configs import prohmr_config
    model = EgoHMR(prohmr_config(), data_dir=world.data_dir)
    missing, unexpected = load_egohmr_weights(model, str(runs / 'full' / 'last_model.pt'))
    assert not missing and not unexpected
    torchrun([f'{script}.py', *flags(world, stage, runs, 'part', 1), '--device', 'cpu'])
    torchrun([f'{script}.py', *flags(world, stage, runs, 'part', 2), '--device', 'cpu', '--resume', str(runs / 'part')])
    assert_same_weights(weights(runs / 'part' / 'last_model.pt'), weights(runs / 'full' / 'last_model.pt'))


def test_sync_bn_without_cuda_is_one_line(world, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA: --sync_bn is allowed')
    script = load_script('train_egohmr')
    assert script.main(flags(world, 'stage2', tmp_path, 'bn', 1, extra=['--sync_bn', 'True'])) == 1
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and '--sync_bn True needs CUDA' in err
    assert not (tmp_path / 'bn').exists()
