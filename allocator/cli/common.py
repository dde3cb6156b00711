"""Steps several commands share: option checks, the scale-fold settings, and profiling a model the
way ``bitalloc profile`` does (the output checks are in :mod:`allocator.cli.outputs`)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from allocator.cli.parser import NOT_GIVEN

if TYPE_CHECKING:
    from allocator.quantize.scalefold import ScaleFoldSettings
    from allocator.table.options import Option
    from allocator.table.sensitivity import SensitivityTable

TRAIN_ACTION_MAPPINGS = ("price", "index")
"""envs.bitalloc_env.ACTION_MAPPINGS (default first), spelled out so that building the parser does not
import gymnasium."""


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # the hub client logs every failed request and retry (about 20 lines for a hub id offline); the
    # one-line error that follows says what matters
    logging.getLogger("huggingface_hub").setLevel(logging.CRITICAL)
    logging.getLogger("huggingface_hub").propagate = False
    logging.basicConfig(level=logging.INFO, format="bitalloc: %(message)s")


def kl_anchors(given: list[str] | None, options: list[Option]) -> list[str] | None:
    """``--kl-anchors`` checked against the options' labels: None (every option) for none or ``all``."""
    from allocator.errors import BitallocError

    if not given or given == ["all"]:
        return None
    labels = [o.label for o in options]
    unknown = sorted(set(given) - set(labels))
    if unknown:
        raise BitallocError(f"--kl-anchors: {unknown[0]!r} is not one of the profiled options ({', '.join(labels)})")
    return given


def scale_fold_settings(args: argparse.Namespace) -> ScaleFoldSettings | None:
    from allocator.errors import BitallocError
    from allocator.quantize.scalefold import DEFAULT_ALPHA, ScaleFoldSettings

    if not args.scale_fold:
        if args.scale_fold_alpha is not NOT_GIVEN:
            raise BitallocError("--scale-fold-alpha needs --scale-fold")
        return None
    return ScaleFoldSettings(alpha=DEFAULT_ALPHA if args.scale_fold_alpha is NOT_GIVEN else args.scale_fold_alpha)


def profile_for(model: str, args: argparse.Namespace) -> SensitivityTable:
    """The sensitivity table of ``model`` with the default options (cached by bitalloc profile)."""
    from allocator.measure.profile import profile_model
    from allocator.model.corpus import load_corpus
    from allocator.model.loading import load_model

    loaded = load_model(model)
    return profile_model(loaded, load_corpus(args.corpus), samples=args.samples, seqlen=args.seqlen, progress=not args.no_progress)


def features_for(model: str, args: argparse.Namespace, options: Sequence[Option], fisher_windows: int = 0,
                 fisher_seqlen: int = 0, activation_statistics: bool = True) -> SensitivityTable:
    """The features table of ``model`` for ``options`` (cached by bitalloc features): all a features-only policy or a loss
    model reads (with the Fisher input a loss model was fitted on; without the calibration forward when
    ``activation_statistics`` is off)."""
    from allocator.measure.features_pass import features_table
    from allocator.model.corpus import load_corpus
    from allocator.model.loading import load_model

    return features_table(load_model(model), load_corpus(args.corpus), options, progress=not args.no_progress,
                          fisher_windows=fisher_windows, fisher_seqlen=fisher_seqlen, activation_statistics=activation_statistics)


def other_bytes(table: SensitivityTable) -> int:
    from allocator.errors import BitallocError

    other = table.metadata.get("other_bytes")
    if not isinstance(other, int):
        raise BitallocError("this table does not record the size of the other tensors; use --bytes or --bpw")
    return other
