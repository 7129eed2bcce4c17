"""COAP collision guidance lowers collisions on the synthetic test split (same seeds, w > 0 versus w = 0).

A trained denoiser reproduces its input near t = 0, which is what lets the guided mean shift of the last steps
reach the output. The stand-in below is that ideal: it predicts x0 = x_t and keeps everything else of EgoHMR
(conditioning, betas head, SMPL decoding, the real COAP weights of tests/assets). The other extreme, a denoiser
that ignores x_t (as one trained for a few iterations does), shows the original's discarded final guided step and
``guide_final_step``. Bodies are lowered 30 cm into the floor so that there are collisions to remove.
"""
import os

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COAP_WEIGHTS = os.path.join(ROOT, 'tests', 'assets', 'coap_synthetic_neutral.ckpt')


class InputReproducingDenoiser(torch.nn.Module):
    """x0 = x_t: an ideal denoiser at small t, wrapped around a real EgoHMR for everything but the GCN."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def sampling_condition(self, batch):
        return self.model.sampling_condition(batch)

    def decode(self, x, cond, batch):
        return self.model.decode(x, cond, batch)

    @property
    def device(self):
        return self.model.device

    def prediction(self, x_t):
        return x_t.float()

    def denoise(self, x_t, timesteps, batch):
        cond = batch['condition']
        output = self.model.decode(self.prediction(x_t), cond, batch)
        output['condition'] = cond
        return output


class InputIgnoringDenoiser(InputReproducingDenoiser):
    """x0 = the mean pose whatever x_t is: a denoiser after a few training iterations, at its worst."""

    def prediction(self, x_t):
        return torch.zeros_like(x_t).float()


@pytest.fixture(scope='module')
def lowered_test_batch(synthetic_world, tmp_path_factory):
    import preprocess_scene_s2_for_train
    from configs import prohmr_config
    from dataloaders.body_rep_stats import compute_body_rep_stats
    from dataloaders.egobody_dataset import EgoBodyDataset
    from utils.egobody import annotation_npz_path

    cubes = str(tmp_path_factory.mktemp('cubes'))
    preprocess_scene_s2_for_train.main(['--split', 'test', '--data_root', synthetic_world.dataset_root,
                                        '--data_dir', synthetic_world.data_dir, '--save_root', cubes, '--seed', '0'])
    cfg = prohmr_config()
    data = np.load(annotation_npz_path(synthetic_world.dataset_root, 'train'))
    x_mean, x_std = compute_body_rep_stats(data['global_orient_pv'], data['pose'])
    dataset = EgoBodyDataset(cfg, synthetic_world.dataset_root, 'test', data_dir=synthetic_world.data_dir,
                             scene_type='cube', cube_root=cubes, scene_downsample_rate=4)
    items = [dataset[i] for i in range(min(4, len(dataset)))]
    batch = torch.utils.data.default_collate(items)
    batch['smpl_params']['transl'] = batch['smpl_params']['transl'] + torch.tensor([0.0, 0.3, 0.0])  # PV y is down
    return cfg, synthetic_world.data_dir, x_mean, x_std, batch


def guided_samples(lowered_test_batch, weight, denoiser_class=InputReproducingDenoiser, guide_final_step=False):
    from diffusion import create_gaussian_diffusion
    from egohmr.coap import load_coap_checkpoint
    from egohmr.evaluate import sample_poses
    from egohmr.guidance import CollisionGuidance
    from egohmr.model import EgoHMR

    cfg, data_dir, x_mean, x_std, batch = lowered_test_batch
    torch.manual_seed(0)
    model = EgoHMR(cfg, data_dir=data_dir, body_rep_mean=x_mean, body_rep_std=x_std, with_coap=True).eval()
    load_coap_checkpoint(model.coap, COAP_WEIGHTS)
    denoiser = denoiser_class(model).eval()
    guidance = CollisionGuidance(model, model.coap, weight) if weight > 0 else None
    torch.manual_seed(1)
    batch = {k: v for k, v in batch.items() if k != 'condition'}
    return sample_poses(denoiser, create_gaussian_diffusion(50, ''), batch, num_samples=2, method='ddpm',
                        guidance=guidance, occupancy_model=model.coap,
                        guide_final_step=guide_final_step)


def mean_collision_ratio(lowered_test_batch, weight, **kwargs):
    return float(np.mean(guided_samples(lowered_test_batch, weight, **kwargs)['collision_ratio']))


def test_guidance_lowers_the_mean_collision_ratio(lowered_test_batch):
    unguided = mean_collision_ratio(lowered_test_batch, 0.0)
    guided = mean_collision_ratio(lowered_test_batch, 2.0)
    print(f'mean collision ratio: w=0 {unguided:.5f}, w=2 {guided:.5f}')
    assert unguided > 0, 'the lowered bodies should collide with the floor'
    assert guided < unguided


def test_final_guided_step_is_discarded_by_default_and_kept_on_request(lowered_test_batch):
    """With a denoiser that ignores x_t only the last step's guided update can reach the output: the original
    discards it (it returns the unguided x0: guided poses equal unguided ones), ``guide_final_step`` keeps it."""
    unguided = guided_samples(lowered_test_batch, 0.0, InputIgnoringDenoiser)
    discarded = guided_samples(lowered_test_batch, 2.0, InputIgnoringDenoiser)
    assert torch.equal(discarded['rotmats'], unguided['rotmats'])
    kept = guided_samples(lowered_test_batch, 2.0, InputIgnoringDenoiser, guide_final_step=True)
    assert not torch.equal(kept['rotmats'], unguided['rotmats'])
    before, after = float(np.mean(unguided['collision_ratio'])), float(np.mean(kept['collision_ratio']))
    print(f'input-ignoring denoiser, mean collision ratio: w=0 {before:.5f}, w=2 + final step {after:.5f}')
    assert before > 0 and after < before
