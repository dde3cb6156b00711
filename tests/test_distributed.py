"""The profile on a 2-worker local Ray cluster writes the serial run's table (tiny model: mechanics only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import allocator.measure.profile as profile_module
from allocator.errors import BitallocError
from allocator.measure.distributed import RaySettings
from allocator.measure.option_weights import OptionWeights
from allocator.measure.profile import cached_table_path, profile_model
from allocator.table.options import parse_options
from tests.cli_helpers import assert_one_line_error, run

ray = pytest.importorskip("ray")

OPTIONS = ["xnor", "rtn2", "gptq2", "gptq3", "gptq4"]


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU local cluster for the module (shut down after it)."""
    settings = RaySettings(address="local", num_cpus=2, object_store_bytes=256 * 2**20)
    started = settings.connect(ray)
    yield settings
    if started:
        ray.shutdown()


def assert_same_table(a, b) -> None:
    assert a.names == b.names and a.labels == b.labels
    np.testing.assert_array_equal(a.bits, b.bits)
    assert set(a.losses) == set(b.losses)
    for loss in a.losses:
        np.testing.assert_array_equal(a.losses[loss], b.losses[loss], err_msg=loss)
    np.testing.assert_array_equal(a.features, b.features)


def test_ray_profile_equals_the_serial_one(loaded, corpus, local_ray) -> None:
    options = parse_options(OPTIONS)
    serial = profile_model(loaded, corpus, options, samples=4, seqlen=32, measure_kl=True, kl_samples=2, cache=False, progress=False)
    on_ray = profile_model(loaded, corpus, options, samples=4, seqlen=32, measure_kl=True, kl_samples=2, cache=False, progress=False,
                           ray=local_ray)
    assert_same_table(serial, on_ray)


def test_ray_profile_keeps_the_serial_weights_and_resumes(loaded, corpus, local_ray, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "serial"))
    options = parse_options(OPTIONS)
    serial = profile_model(loaded, corpus, options, samples=4, seqlen=32, progress=False)
    serial_weights = OptionWeights.beside(cached_table_path(serial), serial.labels)
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "ray"))
    finish = profile_module.layer_result
    calls: list[str] = []

    def interrupted(name, *args, **kwargs):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(name)
        return finish(name, *args, **kwargs)

    monkeypatch.setattr(profile_module, "layer_result", interrupted)
    with pytest.raises(KeyboardInterrupt):
        profile_model(loaded, corpus, options, samples=4, seqlen=32, progress=False, ray=local_ray)
    assert ray.is_initialized()  # the interrupted profile left the cluster it did not start
    calls.clear()
    monkeypatch.setattr(profile_module, "layer_result", lambda name, *a, **k: calls.append(name) or finish(name, *a, **k))
    on_ray = profile_model(loaded, corpus, options, samples=4, seqlen=32, progress=False, ray=local_ray)
    assert len(calls) == len(serial.names) - 5  # the resumed run scored only the layers the first did not save
    assert_same_table(serial, on_ray)
    ray_weights = OptionWeights.beside(cached_table_path(on_ray), on_ray.labels)
    for name in serial.names:
        for label in serial.labels:
            assert torch.equal(serial_weights.load(name, label), ray_weights.load(name, label)), (name, label)


def test_ray_kl_measurement_equals_the_serial_one_and_resumes(loaded, corpus, local_ray, isolated_cache, monkeypatch) -> None:
    """Every (layer, option) KL measured on 2 Ray workers is the serial value bit for bit, also across an interruption."""
    from allocator.measure import layer_kl
    from allocator.measure.distributed_kl import RayKLProbe
    from allocator.table.losses import KL_MEASURED

    table = profile_model(loaded, corpus, parse_options(OPTIONS), samples=4, seqlen=32, progress=False)
    path = cached_table_path(table)
    serial = layer_kl.add_kl_losses(loaded, table, path, corpus.calibration, windows=2, seqlen=16, progress=False)
    monkeypatch.setattr(layer_kl, "CHECKPOINT_EVERY", 2)
    measure_rows = RayKLProbe.measure_rows
    rows: list[int] = []

    def interrupted(self, units):
        for key, values in measure_rows(self, units):
            if len(rows) == 5:
                raise KeyboardInterrupt
            rows.append(key[0])
            yield key, values

    monkeypatch.setattr(RayKLProbe, "measure_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        layer_kl.add_kl_losses(loaded, table, path, corpus.calibration, windows=2, seqlen=16, progress=False, ray=local_ray)
    assert ray.is_initialized()  # the cluster it did not start is left running
    rows.clear()
    monkeypatch.setattr(RayKLProbe, "measure_rows", lambda self, units: (rows.append(k[0]) or (k, v) for k, v in measure_rows(self, units)))
    on_ray = layer_kl.add_kl_losses(loaded, table, path, corpus.calibration, windows=2, seqlen=16, progress=False, ray=local_ray)
    assert len(rows) == len(table.names) - 4  # resumed from the checkpoint of the first four rows
    np.testing.assert_array_equal(on_ray.loss(KL_MEASURED), serial.loss(KL_MEASURED))
    assert np.isfinite(serial.loss(KL_MEASURED)).all() and (serial.loss(KL_MEASURED) > 0).any()


def test_ray_fisher_equals_the_serial_one_and_resumes_a_serial_pass(loaded, corpus, local_ray, isolated_cache, monkeypatch) -> None:
    """The Fisher's chunks on 2 Ray workers add up to the serial diagonals bit for bit (10 windows: a short last
    chunk), also when the Ray pass resumes the checkpoint of an interrupted serial one."""
    import allocator.measure.fisher_gradients as gradients
    from allocator.measure.fisher import cached_fisher, fisher_diagonals
    from allocator.model.tokens import calibration_samples

    windows = calibration_samples(loaded.tokenizer, corpus.calibration, 10, 24, add_bos=False, seed=0)
    serial = fisher_diagonals(loaded.model, windows, seed=0, progress=False)
    on_ray = fisher_diagonals(loaded.model, windows, seed=0, progress=False, ray=local_ray)
    accumulate = gradients.accumulate_window
    calls: list[int] = []

    def interrupted(*args, **kwargs):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(1)
        return accumulate(*args, **kwargs)

    monkeypatch.setattr(gradients, "accumulate_window", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cached_fisher(loaded.model, "tiny", "random", windows, seed=0, progress=False)
    assert len(list((isolated_cache / "fisher").glob("*.partial.safetensors"))) == 1  # the first chunk saved
    resumed = cached_fisher(loaded.model, "tiny", "random", windows, seed=0, progress=False, ray=local_ray)
    assert len(calls) == 5  # the driver ran no window after resuming: the workers did
    for variant, expected in serial.items():
        assert expected.tokens == on_ray[variant].tokens == resumed[variant].tokens == 10 * 23
        for name, tensor in expected.diagonal.items():
            assert torch.equal(tensor, on_ray[variant].diagonal[name]), (variant, name)
            assert torch.equal(tensor, resumed[variant].diagonal[name]), (variant, name)
        assert any(bool((t > 0).any()) for t in expected.diagonal.values())


def test_bad_ray_settings_fail_in_one_line() -> None:
    with pytest.raises(BitallocError, match="at least one CPU"):
        RaySettings(address="local", num_cpus=0)
    with pytest.raises(BitallocError, match="needs 'auto'"):
        RaySettings(address=" ")


def test_an_unreachable_cluster_fails_before_any_work() -> None:
    with pytest.raises(BitallocError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
        RaySettings(address="127.0.0.1:1").check_reachable(seconds=2)
    with pytest.raises(BitallocError, match="is not 'auto', 'local', HOST:PORT"):
        RaySettings(address="somewhere").check_reachable()


@pytest.mark.parametrize("command", ["profile", "run"])
@pytest.mark.parametrize(("flags", "message"), [
    (["--ray", "127.0.0.1:1"], "cannot reach the Ray cluster"),
    (["--ray-cpus", "2"], "--ray-cpus only applies with --ray"),
])
def test_cli_ray_errors_are_one_line(capsys, command, flags, message) -> None:
    extra = ["--bpw", "2.5"] if command == "run" else []
    code, _, err = run(capsys, command, "--model", "smollm2-135m", *extra, *flags)
    assert_one_line_error(code, err, message)


def test_option_scores_do_not_depend_on_the_thread_count() -> None:
    """A Ray worker runs on one thread, the profiling process on several: their scores must agree bit for bit."""
    from allocator.measure.option_scores import score_options
    from allocator.measure.proxies import pricing_quantizer

    quantizers = [pricing_quantizer(o.settings, False) for o in parse_options(["main"])]
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 512, generator=generator) * 0.02
    inputs = torch.randn(2048, 512, generator=generator)
    hessian = 2 * inputs.T @ inputs / len(inputs)
    previous = torch.get_num_threads()
    try:
        scores = []
        for threads in (1, 4):
            torch.set_num_threads(threads)
            scores.append(score_options(quantizers, weight, hessian))
    finally:
        torch.set_num_threads(previous)
    for one, many in zip(*scores):
        assert (one.bits, one.hessian_err, one.weight_err) == (many.bits, many.hessian_err, many.weight_err)
        assert torch.equal(one.quantized.dequantized, many.quantized.dequantized)
