"""Sampling that does not depend on how the test set is split: per-frame random streams, --shard K/N + --merge, and
the test scripts under torchrun.

The exact checks: 2 shares merged (and 2 torchrun processes) give the metrics, results and predictions of one
process bit for bit; every random draw of a frame (diffusion noise, COAP surface samples, flow noise) is the same
whatever batch the frame is in. With another batch size the predictions agree to float rounding (BLAS sums a few rows
and many rows in different orders), which is what is checked there.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from script_loader import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ streams
def test_row_streams_draw_each_rows_own_stream():
    from utils.frame_rng import RowStreams, generator, stream_seed
    seeds = {stream_seed(0, f, s, p, j) for f in (0, 1) for s in (0, 1) for p in ('diffusion_noise', 'coap_surface')
             for j in (0, 1)}
    assert len(seeds) == 16 and all(0 <= v < 2 ** 63 for v in seeds)
    assert stream_seed(1, 0, 0, 'flow_noise') != stream_seed(0, 0, 0, 'flow_noise')
    rows = RowStreams.sample_major(7, [10, 11, 12], first_sample=2, num_samples=2)
    assert list(zip(rows.frames, rows.samples)) == [(10, 2), (11, 2), (12, 2), (10, 3), (11, 3), (12, 3)]
    frame_major = RowStreams.frame_major(7, [10, 11], first_sample=1, num_samples=2)
    assert list(zip(frame_major.frames, frame_major.samples)) == [(10, 1), (10, 2), (11, 1), (11, 2)]
    drawn = rows.randn(5, 'diffusion_noise', step=3)
    for r, (f, s) in enumerate(zip(rows.frames, rows.samples)):
        assert torch.equal(drawn[r], torch.randn(5, generator=generator(7, f, s, 'diffusion_noise', 3)))
    assert not torch.equal(drawn, rows.randn(5, 'diffusion_noise', step=4))
    with pytest.raises(ValueError, match='unknown stream purpose'):
        stream_seed(0, 0, 0, 'dropout')


def test_per_body_surface_draws_do_not_depend_on_the_batch():
    from egohmr.coap.sampling import draw_face_samples, sample_points_on_faces
    from utils.frame_rng import generator
    g = torch.Generator().manual_seed(0)
    vertices = torch.randn(3, 12, 3, generator=g)
    faces = torch.tensor([[[0, 1, 2], [3, 4, 5], [-1, -1, -1]], [[6, 7, 8], [9, 10, 11], [0, 5, 9]]])
    gens = [generator(1, f, 0, 'coap_surface') for f in range(3)]
    chosen, weights = draw_face_samples(vertices, faces, 6, gens)
    for b in range(3):
        alone_c, alone_w = draw_face_samples(vertices[b:b + 1], faces, 6, [generator(1, b, 0, 'coap_surface')])
        assert torch.equal(chosen[b], alone_c[0]) and torch.equal(weights[b], alone_w[0])
    assert (chosen[:, 0] < 2).all()                              # the padding row (zero area) is never drawn
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, 6))
    points = sample_points_on_faces(vertices, faces, 6, [generator(1, f, 0, 'coap_surface') for f in range(3)])
    corners = vertices[torch.arange(3)[:, None, None, None], faces.clamp_min(0)[None].expand(3, -1, -1, -1)
                       .gather(2, chosen[..., None].expand(-1, -1, -1, 3))]          # [3, 2, 6, 3, 3] by hand
    torch.testing.assert_close(points, (weights[..., None] * corners).sum(-2))
    with pytest.raises(ValueError, match='2 generators for 3 bodies'):
        draw_face_samples(vertices, faces, 6, gens[:2])


def test_diffusion_loop_takes_its_noise_from_noise_fn():
    from diffusion import create_gaussian_diffusion
    diffusion = create_gaussian_diffusion(50, 'ddim5')
    calls = []

    def noise_fn(x, t):
        calls.append(int(t[0]))
        return torch.full_like(x, 0.5)
    model = lambda x, t, batch: {'pred_x_start': torch.zeros_like(x)}   # noqa: E731
    start = torch.ones(2, 3)
    out = diffusion.sample(model, (2, 3), method='ddpm', noise=start, model_kwargs={'batch': {}}, noise_fn=noise_fn)
    assert calls == [4, 3, 2, 1, 0]
    # x0 = 0 at every step: x_{t-1} = coef2 * x_t + sigma_t * 0.5 (no noise at the last step), by hand
    x = start.double()
    for j in range(4, -1, -1):
        sigma = np.exp(0.5 * diffusion.posterior_log_variance_clipped[j]) if j > 0 else 0.0
        x = diffusion.posterior_mean_coef2[j] * x + sigma * 0.5
    torch.testing.assert_close(out['sample'].double(), x, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='noise_fn returned a tensor of shape'):
        diffusion.sample(model, (2, 3), method='ddim', model_kwargs={'batch': {}},
                         noise_fn=lambda x, t: torch.zeros(1, 3))


# ------------------------------------------------------------------------------------------------ the scripts
@pytest.fixture(scope='module')
def split_world(synthetic_world, tmp_path_factory):
    """The tiny world with stage-1 crops and stage-2 GT cubes of the test split, an (untrained, ActNorm-initialised)
    stage-1 checkpoint and a random stage-2 checkpoint with its statistics."""
    from configs import get_config, prohmr_config
    from dataloaders.body_rep_stats import save_body_rep_stats
    from egohmr.checkpoints import save_egohmr_checkpoint
    from egohmr.model import EgoHMR
    from prohmr_scene.checkpoints import save_stage1_checkpoint
    from prohmr_scene.model import ProHMRScene
    base = tmp_path_factory.mktemp('split_world')
    root = str(base / 'egobody')
    os.makedirs(root)
    for entry in os.listdir(synthetic_world.dataset_root):
        os.symlink(os.path.join(synthetic_world.dataset_root, entry), os.path.join(root, entry))
    load_script('preprocess_scene_s1').main(['--split', 'test', '--data_root', root, '--scene_verts_num_target', '300'])
    load_script('preprocess_scene_s2_for_train').main(['--split', 'test', '--data_root', root, '--data_dir',
                                                       synthetic_world.data_dir, '--seed', '0'])
    torch.manual_seed(0)
    stage1 = ProHMRScene(get_config(), data_dir=synthetic_world.data_dir)
    with torch.no_grad():
        for name, buffer in stage1.named_buffers():
            if name.endswith('initialized'):
                buffer.fill_(True)                 # as trained: no ActNorm data init from the first test batch
    stage1_path = str(base / 's1' / 'best_model.pt')
    save_stage1_checkpoint(stage1, stage1_path)
    stage2_path = str(base / 's2' / 'best_model_vis.pt')
    save_egohmr_checkpoint(EgoHMR(prohmr_config(), data_dir=synthetic_world.data_dir, with_coap=True), stage2_path)
    g = np.random.default_rng(0)
    save_body_rep_stats(str(base / 's2' / 'preprocess_stats'), g.normal(0, 0.3, 144), np.full(144, 0.5))
    yield types.SimpleNamespace(root=root, data_dir=synthetic_world.data_dir, stage1=stage1_path, stage2=stage2_path,
                                base=base)
    import shutil
    shutil.rmtree(base, ignore_errors=True)


def stage2_flags(world, save_root, batch_size, extra=()):
    return ['--dataset_root', world.root, '--data_dir', world.data_dir, '--checkpoint', world.stage2,
            '--two_stage', 'False', '--scene_crop_by_stage1_transl', 'False', '--timestep_respacing_eval', 'ddim5',
            '--with_coap_grad', 'False', '--num_samples', '2', '--scene_downsample_rate', '8', '--num_workers', '0',
            '--seed', '3', '--save_results', 'True', '--log_freq', '0', '--batch_size', str(batch_size),
            '--save_root', str(save_root), *extra]


def read_outputs(out_dir, results_name):
    """``(metrics.json, the results pickle, predictions.npz)`` of a test script's output folder."""
    with open(os.path.join(out_dir, 'metrics.json')) as f:
        metrics = json.load(f)
    with open(os.path.join(out_dir, results_name), 'rb') as f:
        results = pickle.load(f)
    with np.load(os.path.join(out_dir, 'predictions.npz')) as data:
        return metrics, results, {k: data[k] for k in data.files}


def stage2_outputs(save_root):
    return read_outputs(os.path.join(str(save_root), 'output_egohmr_s2'), 'results_seed_3.pkl')


def assert_same_outputs(a, b):
    metrics_a, results_a, pred_a = a
    metrics_b, results_b, pred_b = b
    assert metrics_a == metrics_b
    assert results_a.keys() == results_b.keys() and pred_a.keys() == pred_b.keys()
    for key in results_a:
        np.testing.assert_array_equal(results_a[key], results_b[key], err_msg=key)
    for key in pred_a:
        np.testing.assert_array_equal(pred_a[key], pred_b[key], err_msg=key)


def test_stage2_two_shares_merged_equal_one_process_and_another_batch_size_agrees(split_world, tmp_path, capsys):
    script = load_script('test_egohmr')
    assert script.main(stage2_flags(split_world, tmp_path / 'one', 2)) == 0
    one = stage2_outputs(tmp_path / 'one')
    num_frames = one[0]['num_frames']
    assert num_frames >= 4 and one[0]['collision_ratio'] is not None
    np.testing.assert_array_equal(one[2]['frame_index'], np.arange(num_frames))
    for k in (1, 0):                      # any order; then the merge, with the same flags
        assert script.main(stage2_flags(split_world, tmp_path / 'split', 2, ['--shard', f'{k}/2'])) == 0
    share = torch.load(os.path.join(str(tmp_path / 'split'), 'output_egohmr_s2', 'shards', 'shard_0_of_2.pt'),
                       weights_only=False)
    assert list(share['frame_index']) == [0, 1]          # whole batches: share 0 of 2 holds batch 0 of 3
    assert script.main(stage2_flags(split_world, tmp_path / 'split', 2, ['--merge', 'True'])) == 0
    assert_same_outputs(stage2_outputs(tmp_path / 'split'), one)

    capsys.readouterr()                  # a merge with other flags, or with a share missing, is refused in one line
    assert script.main(stage2_flags(split_world, tmp_path / 'split', 2, ['--merge', 'True', '--seed', '4'])) == 1
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and 'seed=3' in err and "expected 4" in err
    os.remove(os.path.join(str(tmp_path / 'split'), 'output_egohmr_s2', 'shards', 'shard_1_of_2.pt'))
    assert script.main(stage2_flags(split_world, tmp_path / 'split', 2, ['--merge', 'True'])) == 1
    assert 'lacks share(s) 1/2' in capsys.readouterr().err
    assert script.main(stage2_flags(split_world, tmp_path / 'x', 2, ['--shard', '2/2'])) == 2
    assert '0 <= K < N' in capsys.readouterr().err

    assert script.main(stage2_flags(split_world, tmp_path / 'bs3', 3)) == 0
    metrics, results, predictions = stage2_outputs(tmp_path / 'bs3')
    np.testing.assert_array_equal(results['collision_ratio_list'], one[1]['collision_ratio_list'])
    for key in ('joints', 'body_pose', 'betas'):
        np.testing.assert_allclose(predictions[key], one[2][key], rtol=0, atol=1e-5, err_msg=key)
    for key, value in one[0].items():       # mm, or ratios; the diversity terms (~0.02 mm) are differences of
        if isinstance(value, float):        # near-equal samples: their relative rounding error is larger
            assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-3), key


def test_stage2_under_torchrun_equals_one_process(split_world, tmp_path):
    """torchrun runs its processes with OMP_NUM_THREADS=1; so does the reference (the thread count changes how BLAS
    splits a sum, hence the last bits)."""
    script = load_script('test_egohmr')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert script.main(stage2_flags(split_world, tmp_path / 'one', 2)) == 0
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           os.path.join(ROOT, 'test_egohmr.py'), *stage2_flags(split_world, tmp_path / 'ddp', 2, ['--device', 'cpu'])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_outputs(stage2_outputs(tmp_path / 'ddp'), stage2_outputs(tmp_path / 'one'))


def test_stage1_two_shares_merged_equal_one_process(split_world, tmp_path):
    script = load_script('test_prohmr_scene')

    def flags(save_root, extra=()):
        return ['--dataset_root', split_world.root, '--data_dir', split_world.data_dir, '--checkpoint',
                split_world.stage1, '--num_samples', '3', '--batch_size', '2', '--num_workers', '0', '--seed', '1',
                '--log_freq', '0', '--save_root', str(save_root), *extra]

    def outputs(save_root):
        return read_outputs(os.path.join(str(save_root), 'output_prohmr_scene_s1'), 'results.pkl')
    assert script.main(flags(tmp_path / 'one')) == 0
    for k in range(2):
        assert script.main(flags(tmp_path / 'split', ['--shard', f'{k}/2'])) == 0
    assert script.main(flags(tmp_path / 'split', ['--merge', 'True'])) == 0
    one, merged = outputs(tmp_path / 'one'), outputs(tmp_path / 'split')
    assert_same_outputs(merged, one)
    joints = one[2]['joints']
    assert joints.shape[1] == 3 and np.abs(joints[:, 1] - joints[:, 2]).max() > 1e-3   # random samples differ
