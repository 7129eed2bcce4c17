import numpy as np
import pytest
import torch

from utils import geometry as g


def random_rotmats(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return g.aa_to_rotmat(torch.randn(n, 3, generator=gen, dtype=torch.float64))


def test_aa_to_rotmat_matches_hand_computed_quarter_turn():
    R = g.aa_to_rotmat(torch.tensor([[0.0, 0.0, np.pi / 2]], dtype=torch.float64))[0]
    expected = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(R, expected, atol=1e-7)


def test_rotmats_are_orthonormal_and_aa_round_trips():
    R = random_rotmats(500)
    eye = torch.eye(3, dtype=R.dtype).expand_as(R)
    assert torch.allclose(R @ R.transpose(-1, -2), eye, atol=1e-10)
    assert torch.allclose(torch.det(R), torch.ones(500, dtype=R.dtype), atol=1e-10)
    assert torch.allclose(g.aa_to_rotmat(g.rotmat_to_aa(R)), R, atol=1e-6)


def test_rotmat_to_aa_handles_identity_and_near_pi():
    aa = torch.tensor([[0.0, 0.0, 0.0], [np.pi - 1e-4, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    back = g.rotmat_to_aa(g.aa_to_rotmat(aa))
    assert torch.allclose(g.aa_to_rotmat(back), g.aa_to_rotmat(aa), atol=1e-6)
    assert torch.isfinite(back).all()


@pytest.mark.parametrize('mode', ['prohmr', 'diffusion'])
def test_rot6d_round_trip(mode):
    R = random_rotmats(100, seed=1)
    assert torch.allclose(g.rot6d_to_rotmat(g.rotmat_to_rot6d(R, mode), mode), R, atol=1e-10)


def test_rot6d_layouts_order_the_entries_as_specified():
    R = torch.arange(9, dtype=torch.float64).reshape(3, 3)  # R[i, j] = 3i + j
    # prohmr: [R00, R10, R20, R01, R11, R21]; diffusion: [R00, R01, R10, R11, R20, R21]
    assert g.rotmat_to_rot6d(R, 'prohmr').tolist() == [0, 3, 6, 1, 4, 7]
    assert g.rotmat_to_rot6d(R, 'diffusion').tolist() == [0, 1, 3, 4, 6, 7]


def test_rot6d_accepts_flat_multi_joint_vectors_and_orthogonalises():
    x = torch.randn(2, 24 * 6, dtype=torch.float64)
    R = g.rot6d_to_rotmat(x, 'diffusion')
    assert R.shape == (2, 24, 3, 3)
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=R.dtype).expand_as(R), atol=1e-10)
    with pytest.raises(ValueError, match='layout'):
        g.rot6d_to_rotmat(x, 'other')


def test_perspective_projection_hand_computed():
    pts = torch.tensor([[[0.5, -0.2, 2.0]]])
    uv = g.perspective_projection(pts, torch.tensor([[0.0, 0.2, 0.0]]), torch.tensor([[1000.0, 1000.0]]),
                                  torch.tensor([[960.0, 540.0]]))
    assert torch.allclose(uv, torch.tensor([[[960.0 + 250.0, 540.0]]]))


def test_transform_points_numpy_and_torch_agree():
    T = np.eye(4)
    T[:3, :3] = g.rotation_about_y(0.3)
    T[:3, 3] = [1.0, 2.0, 3.0]
    pts = np.random.default_rng(0).normal(size=(10, 3))
    out_np = g.transform_points(pts, T)
    out_t = g.transform_points(torch.as_tensor(pts), T).numpy()
    assert np.allclose(out_np, (T @ np.c_[pts, np.ones(10)].T).T[:, :3])
    assert np.allclose(out_np, out_t)
    assert np.allclose(g.transform_points(out_np, np.linalg.inv(T)), pts)
