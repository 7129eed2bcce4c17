"""End-to-end: the README's ``make demo`` pipeline at its tiny size (every script, as a user types it)."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def tiny_demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('demo'))
    env = dict(os.environ, OUT=out, DEMO_SIZE='tiny', PY=sys.executable)
    proc = subprocess.run(['bash', os.path.join(ROOT, 'demo.sh')], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    yield out, proc.stdout
    shutil.rmtree(out, ignore_errors=True)        # about 2 GB of checkpoints


def _finite_numbers(obj):
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _finite_numbers(value)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def test_demo_writes_finite_metrics_for_every_run(tiny_demo):
    out, stdout = tiny_demo
    paths = [os.path.join(out, 'results', 'output_prohmr_scene_demo', 'metrics.json')]
    paths += [os.path.join(out, 'results', f'stage2_{name}', 'output_egohmr_demo', 'metrics.json')
              for name in ('ddim5', 'ddpm_coap', 'gt_ddpm_coap_False', 'gt_ddpm_coap_True')]
    for path in paths:
        with open(path) as f:
            values = list(_finite_numbers(json.load(f)))
        assert values, f'{path} holds no numbers'
        assert all(math.isfinite(v) for v in values), path
    with open(os.path.join(out, 'metrics.json')) as f:
        table = json.load(f)
    assert len(table['runs']) == 5
    assert 'g_mpjpe' in table['metrics'] and 'collision_ratio' in table['metrics']
    assert os.path.isfile(os.path.join(out, 'metrics.md'))
    assert '| metric' in stdout
    # the world's test split has joints outside the image, so the unseen-joint columns are numbers
    for key in ('mpjpe_invis', 'mpjpe_invis_min_of_n', 'g_mpjpe_invis'):
        stage2 = [v for run, v in table['metrics'][key].items() if run.startswith('stage 2')]
        assert stage2 and all(v is not None and math.isfinite(v) for v in stage2), (key, table['metrics'][key])


def test_demo_page_links_every_picture(tiny_demo):
    out, _ = tiny_demo
    import re
    page = open(os.path.join(out, 'index.html')).read()
    links = set(re.findall(r'(?:src|href)="([^"]+)"', page))
    assert links and all(os.path.isfile(os.path.join(out, link)) for link in links), links
    kinds = {os.path.basename(link) for link in links}
    assert {'per_joint_errors.png', 'curves.png'} <= kinds and any(k.endswith('.jpg') for k in kinds)
    assert 'class="invis"' in page
    for run in ('output_prohmr_scene_demo', 'stage2_ddim5'):
        assert any(run in link and link.endswith('per_joint_errors.png') for link in links), run


def test_collision_guidance_lowers_the_collision_ratio(tiny_demo):
    """Same seeds, GT translations, the tiny world's seated test person, with --guide_final_step (see demo.sh): the
    guided run's collision ratio is lower. (The whole tiny pipeline, COAP's 150 training steps included, is
    bit-reproducible on the CPU, so this compares two fixed numbers.)"""
    out, _ = tiny_demo
    ratios = {}
    for guidance in ('False', 'True'):
        path = os.path.join(out, 'results', f'stage2_gt_ddpm_coap_{guidance}', 'output_egohmr_demo', 'metrics.json')
        with open(path) as f:
            ratios[guidance] = json.load(f)['collision_ratio']
    assert ratios['False'] > 0, 'the guidance check needs collisions to remove'
    print('collision ratio without / with guidance:', ratios)
    assert ratios['True'] < ratios['False'], ratios


def test_demo_renders_images(tiny_demo):
    out, _ = tiny_demo
    renders = [f for _, _, files in os.walk(os.path.join(out, 'render')) for f in files if f.endswith('.jpg')]
    assert renders
