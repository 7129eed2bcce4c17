"""Interactive 3D viewer of test results in the browser (viser): scene, GT body, every sample, camera and image.

Example::

    python visualize_results.py --results outputs/demo/results/stage2_ddpm_coap/output_egohmr_demo \\
        --dataset_root outputs/demo/world/egobody            # then open http://127.0.0.1:8080

``--results`` is the ``predictions.npz`` that ``test_egohmr.py`` / ``test_prohmr_scene.py`` write beside
``metrics.json`` (or its folder). ``--save_recording out.html`` writes a self-contained page that plays the frames
back in any browser, without Python (and exits, unless ``--serve True``). Needs the optional ``viser`` package.
"""
from __future__ import annotations

import argparse
import sys

from utils.run import str2bool


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split('\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--results', required=True, help='predictions.npz of a test script, or the folder holding it')
    p.add_argument('--dataset_root', default=None,
                   help='EgoBody root: scene meshes and input images (without it only the bodies are shown)')
    p.add_argument('--host', default='127.0.0.1', help='address to serve on (0.0.0.0: reachable from the network)')
    p.add_argument('--port', type=int, default=8080, help='port to serve on')
    p.add_argument('--scene', default='mesh', choices=['mesh', 'points', 'none'],
                   help='scene as its mesh, as the points within --crop_radius of the GT pelvis, or not at all')
    p.add_argument('--crop_radius', type=float, default=2.0, help='metres around the GT pelvis for --scene points')
    p.add_argument('--frames', default='all', choices=['all', 'invisible'],
                   help='frames of --save_recording: all, or only those with joints outside the image')
    p.add_argument('--save_recording', default=None, help='write a self-contained HTML playback of the frames')
    p.add_argument('--seconds_per_frame', type=float, default=1.5, help='playback speed of --save_recording')
    p.add_argument('--serve', type=str2bool, default=None,
                   help='serve the viewer (default: True, False when --save_recording is given)')
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"error: --port must be in 1..65535, got {args.port}", file=sys.stderr)
        return 2
    if args.crop_radius <= 0 or args.seconds_per_frame <= 0:
        print("error: --crop_radius and --seconds_per_frame must be > 0", file=sys.stderr)
        return 2
    from utils.viewer import viser_missing
    missing = viser_missing()
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 1
    import numpy as np

    from utils.io import DataError
    from utils.predictions import load_predictions
    from utils.viewer import FrameSource, ResultsViewer, set_initial_camera, start_server, write_recording
    try:
        pred = load_predictions(args.results)
        source = FrameSource(pred, args.dataset_root)
        source.scene_to_pv(0)                          # fail early on a wrong --dataset_root
        serve = args.serve if args.serve is not None else args.save_recording is None
        server = start_server(args.host, args.port, verbose=serve)
        set_initial_camera(server, pred)
        viewer = ResultsViewer(server, source, args.scene, args.crop_radius)
        if args.save_recording:
            frames = (list(np.flatnonzero((~pred['vis_mask']).any(axis=1))) if args.frames == 'invisible'
                      else None)
            if frames == []:
                print("note: no frame has joints outside the image; recording all frames")
                frames = None
            path = write_recording(server, viewer, args.save_recording, frames, args.seconds_per_frame)
            print(f"recording written to {path} (open it in a browser; no server needed)")
            viewer.show_frame(0)
        if not serve:
            server.stop()
            return 0
        print(f"viewer on http://{args.host}:{server.get_port()} "
              f"({source.num_frames} frames x {source.num_samples} samples); Ctrl+C stops it")
        server.sleep_forever()
    except (DataError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == '__main__':
    sys.exit(main())
