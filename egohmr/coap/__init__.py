"""COAP body occupancy (Mihajlovic et al., CVPR 2022), its checkpoints, training, and a weight-free exact counterpart.

* :class:`COAPBodyModel` / :func:`attach_coap` -- the learned occupancy with the original state_dict layout;
* :func:`load_coap_checkpoint` / :func:`save_coap_checkpoint` -- official ``coap_smpl_*.ckpt`` files, no Lightning;
* :class:`ExactOccupancy` -- occupancy from the posed mesh itself (generalised winding number), same calls.
"""
from egohmr.coap.checkpoint import load_coap_checkpoint, save_coap_checkpoint
from egohmr.coap.exact import ExactOccupancy
from egohmr.coap.model import COAPBodyModel, attach_coap
from egohmr.coap.partition import Partitioner

__all__ = ['COAPBodyModel', 'attach_coap', 'load_coap_checkpoint', 'save_coap_checkpoint', 'ExactOccupancy',
           'Partitioner']
