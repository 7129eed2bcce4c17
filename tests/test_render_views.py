"""utils.render_views: the half-size panels are rendered with the camera of the halved image."""
import numpy as np

from utils.render_views import scaled_intrinsics, scaled_size


def test_scaled_intrinsics_project_where_the_resized_image_has_the_point():
    import cv2
    fx, fy, cx, cy = 1500.0, 1490.0, 955.3, 541.7
    point = np.array([0.31, -0.12, 2.4])
    u, v = fx * point[0] / point[2] + cx, fy * point[1] / point[2] + cy
    sfx, sfy, scx, scy = scaled_intrinsics((fx, fy, cx, cy), 0.5)
    assert (sfx, sfy) == (750.0, 745.0)
    np.testing.assert_allclose([sfx * point[0] / point[2] + scx, sfy * point[1] / point[2] + scy],
                               [(u + 0.5) / 2 - 0.5, (v + 0.5) / 2 - 0.5])
    # that is cv2.resize's pixel-centre mapping: INTER_AREA of a column ramp puts value u' at the mean of 2u', 2u'+1
    ramp = np.tile(np.arange(8, dtype=np.float32), (4, 1))
    halved = cv2.resize(ramp, (4, 2), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(halved[0], [2 * k + 0.5 for k in range(4)])   # full-size u of pixel k
    assert scaled_intrinsics((1, 1, 2.5, 0), 0.5)[2] == 1.0          # a principal point at u = 2.5 -> u' = 1
    assert scaled_size((1920, 1080), 0.5) == (960, 540) and scaled_size((3, 1), 0.5) == (2, 1)
