"""Stage 2's yacs config (configs/egohmr.yaml): flags keep their names and defaults and override it when given; the
model is built from it."""
import importlib.util
import os

import pytest

from configs import egohmr_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_parser():
    spec = importlib.util.spec_from_file_location('train_egohmr', os.path.join(ROOT, 'train_egohmr.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_flag_defaults_are_the_config_values():
    args = train_parser().parse_args([])
    before = dict(vars(args))
    cfg = egohmr_config(None, args, explicit=())
    assert vars(args) == before                                   # nothing to change: the defaults agree
    s = cfg.EGOHMR
    assert (s.SCENE_CANO, s.COND_MASK_PROB, s.PELVIS_VIS_LOOSEN, s.START_COAP_EPOCH) == (True, 0.01, False, 3)
    assert s.LOSS_WEIGHTS.V2V == args.weight_loss_v2v == 0.5
    assert s.LOSS_WEIGHTS.COAP_PENETRATION == args.weight_coap_penetration == 0.0002
    assert s.TIMESTEP_RESPACING_EVAL == args.timestep_respacing_eval == 'ddim5'


def test_given_flags_override_the_config_and_a_config_file_sets_the_rest(tmp_path):
    parser = train_parser()
    argv = ['--weight_loss_v2v', '0.7', '--scene_cano', 'False']
    args = parser.parse_args(argv)
    cfg = egohmr_config(None, args, explicit={'weight_loss_v2v', 'scene_cano'})
    assert cfg.EGOHMR.LOSS_WEIGHTS.V2V == pytest.approx(0.7) and cfg.EGOHMR.SCENE_CANO is False
    own = tmp_path / 'mine.yaml'
    own.write_text('EGOHMR:\n  COND_MASK_PROB: 0.2\n  LOSS_WEIGHTS:\n    BETAS: 0.01\n')
    args = parser.parse_args(['--weight_loss_betas', '0.5'])
    cfg = egohmr_config(str(own), args, explicit={'weight_loss_betas'})
    assert cfg.EGOHMR.COND_MASK_PROB == pytest.approx(0.2) and args.cond_mask_prob == pytest.approx(0.2)
    assert cfg.EGOHMR.LOSS_WEIGHTS.BETAS == pytest.approx(0.5)            # the given flag wins over the file


def test_model_from_config_has_the_configured_settings(body_model_dir):
    from egohmr.model import EgoHMR
    args = train_parser().parse_args([])
    cfg = egohmr_config(None, args, explicit=())
    trained = EgoHMR.from_config(cfg, data_dir=body_model_dir, training=True, with_coap=False)
    assert trained.cond_mask_prob == pytest.approx(0.01) and trained.loss_weights['v2v'] == pytest.approx(0.5)
    assert trained.pelvis_vis_loosen is False and trained.diffuse_fuse is False
    tested = EgoHMR.from_config(cfg, data_dir=body_model_dir, training=False, pelvis_vis_loosen=True,
                                diffuse_fuse=True, with_coap=False)
    assert tested.cond_mask_prob == 0.0 and all(w == 0.0 for w in tested.loss_weights.values())
    assert tested.pelvis_vis_loosen is True and tested.diffuse_fuse is True
    assert trained.state_dict().keys() == tested.state_dict().keys()
