"""Checkpoints: self-verifying files, checkpoint folders written by every rank, their atomic commit
and safe load, and the policy of a run's step checkpoints (decide, stage, commit in the background
or not, prune, resume).

Knows nothing about GPTs: it saves and loads dicts of tensors and plain values.

- :mod:`.fileformat`: the digest a file carries in its zip comment;
- :mod:`.files`: the commit protocol, the verified load, names, leftovers;
- :mod:`.folders`: a checkpoint folder's manifest, digests, removal and leftovers;
- :mod:`.sharded`: writing and reading a folder through torch.distributed.checkpoint (DCP), which
  this package imports only when a folder is written or read;
- :mod:`.dcpindex`: a folder's DCP index, read through an allow-list and checked to be well-formed;
- :mod:`.snapshot`: a CPU copy of a state for a background write;
- :mod:`.observe`: observers of checkpoint writes (tests and the chaos harness watch through them);
- :mod:`.storage`: the few filesystem operations the rest needs, and the local disk's implementation;
- :mod:`.stepdir`: the folder of a run's step checkpoints (list, obstacles, prune, set aside, leftovers);
- :mod:`.writer`: one commit at a time, now or on a writer thread;
- :mod:`.manager`: the policy of a run's step checkpoints: decide, stage, commit, prune;
- :mod:`.resume`: which checkpoint a run resumes from.
"""

from ..errors import CheckpointError, CheckpointWriteError
from .files import (CHECKSUM_SUFFIX, FORMAT_VERSION, FORMAT_VERSION_KEY, KIND_KEY, STEP_FOLDER_PATTERN, STEP_PATTERN,
                    accepted_digests,
                    checksum_path, load_checkpoint, read_verified, remove_leftovers, save_atomically, state_nbytes,
                    step_folder_path, step_of, step_path, verify_file, write_checksum_file)
from .folders import is_checkpoint_folder, remove_unfinished
from .manager import CheckpointManager
from .resume import resolve_resume
from .observe import CheckpointObserver, observe
from .stepdir import ABANDONED, CheckpointDir, StepCheckpoint
from .storage import LOCAL, LocalStorage, Storage

__all__ = [
    "ABANDONED", "CHECKSUM_SUFFIX", "FORMAT_VERSION", "FORMAT_VERSION_KEY", "KIND_KEY", "LOCAL", "STEP_FOLDER_PATTERN",
    "STEP_PATTERN",
    "CheckpointDir", "CheckpointError", "CheckpointManager", "CheckpointObserver", "CheckpointWriteError",
    "LocalStorage", "StepCheckpoint", "Storage", "accepted_digests", "checksum_path", "is_checkpoint_folder",
    "load_checkpoint", "observe", "read_verified", "remove_leftovers", "remove_unfinished",
    "resolve_resume", "save_atomically", "state_nbytes", "step_folder_path", "step_of", "step_path", "verify_file",
    "write_checksum_file"
]
