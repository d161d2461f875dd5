"""Fixtures of the values area: the reference computation, the tolerances, one checker for every comparison.

Imported by ``suites/conftest.py`` only, like ``capture_conformance.harness.pytest_plugin.fixtures``. The reference
model is loaded once per process (``capture_conformance.harness.protocol.reference.get_reference``), on the
first values test, so runs that deselect the area never pay for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from capture_conformance.harness.protocol.client import CaptureClient, ServerFault
from capture_conformance.harness.protocol.dialects import V1, missing
from capture_conformance.harness.pytest_plugin.fixtures import _record_fact
from capture_conformance.harness.protocol.ground_truth import GroundTruth
from capture_conformance.harness.protocol.reference import ReferenceStatus, Site, get_reference
from capture_conformance.harness.protocol.responses import Completion
from capture_conformance.harness.protocol.runs import CaptureRuns
from capture_conformance.harness.protocol.values import Comparison, compare, tolerance_for

NOT_VERIFIABLE = "values not verifiable"


@pytest.fixture(scope="session")
def value_reference(capture_model: str, ground_truth: GroundTruth, pytestconfig: pytest.Config) -> ReferenceStatus:
    explicit = pytestconfig.getoption("reference_model", None)
    status = get_reference(capture_model, reference_model=explicit,
                           device=pytestconfig.getoption("reference_device", None) or "cpu",
                           model_dir=ground_truth.model_dir)
    _record_fact(pytestconfig, "values_reference", status.describe())
    return status


@pytest.fixture(scope="session")
def server_model_dtype(capture_client: CaptureClient, capture_model: str) -> str | None:
    """The model's dtype as the server's ``/v1/models`` states it (its ``capture.dtype``), or None."""
    dtype = (capture_client.capture_block(capture_model) or {}).get("dtype")
    return dtype if isinstance(dtype, str) else None


@dataclass
class ValueChecks:
    """Compares every savepoint of a completion with the reference; fails with what the value looks like."""

    status: ReferenceStatus
    runs: CaptureRuns
    truth: GroundTruth
    model_dtype: str | None
    override: float | None
    config: pytest.Config

    def require(self) -> None:
        if not self.status.available:
            pytest.skip(f"{NOT_VERIFIABLE}: {self.status.reason}")

    def prompt_ids(self, completion: Completion) -> list[int]:
        """The server's ``prompt_token_ids`` when it gives them, else the harness's chat-template rendering."""
        given = completion.body.get("prompt_token_ids")
        if given is not None:
            if not (isinstance(given, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in given)):
                raise ServerFault(f"prompt_token_ids should be a list of ints, got {str(given)[:200]}")
            if given:
                return given
        rendered = self.truth.prompt_ids(completion.request.get("messages") or [])
        if rendered is None:
            pytest.skip(f"{NOT_VERIFIABLE}: the server returns no prompt_token_ids and the harness has no tokenizer "
                        f"to render the prompt ({self.truth.tokenizer_note or 'no local model directory'})")
        return rendered

    def generated_ids(self, completion: Completion) -> list[int]:
        """``completion_token_ids``; in a dialect without them, the argmax of greedy all-token logits.

        Under greedy decoding the logits' argmax at step i is generated token i, so an older-family
        answer (``store_activations``, no ids) is still value-checked: the reference pass runs over
        the prompt and those ids, and a capture that is not the logits (probabilities, another
        module) is told apart as everywhere else. The count must agree with ``usage``.
        """
        if "completion_token_ids" in completion.body or completion.dialect == V1:
            return completion.token_ids
        temperature = completion.request.get("temperature")
        meta = completion.meta.get("_logits")
        if temperature not in (0, 0.0) or meta is None or meta.raw.get("tokens", "all") != "all":
            missing("'completion_token_ids' in chat responses", completion.dialect)
        tensor = self.runs.tensor(completion, "_logits")
        if tensor.values.ndim != 3 or tensor.values.shape[0] != 1:
            raise AssertionError(f"`_logits` is {list(tensor.values.shape)}, not [1, steps, V]: no ids can be read "
                                 f"from its argmax (the answer gives no generated ids)")
        ids = [int(i) for i in tensor.values[0].argmax(axis=-1)]
        if len(ids) != completion.usage.completion_tokens:
            raise AssertionError(f"`_logits` has {len(ids)} steps but usage.completion_tokens is "
                                 f"{completion.usage.completion_tokens}: the greedy argmax cannot stand in for the "
                                 f"generated ids this dialect does not give")
        return ids

    def check(self, completion: Completion, names: list[str] | None = None) -> list[Comparison]:
        """Compare the named savepoints (default: all) of ``completion``; one assertion listing every failure."""
        self.require()
        reference = self.status.reference
        assert reference is not None
        prompt = self.prompt_ids(completion)
        ids = self.generated_ids(completion)
        usage = completion.usage
        if usage.prompt_tokens != len(prompt):
            raise AssertionError(
                f"usage.prompt_tokens is {usage.prompt_tokens} but the prompt has {len(prompt)} ids "
                f"({'prompt_token_ids' if 'prompt_token_ids' in completion.body else 'chat-template rendering'}): "
                f"the reference pass would not see what the server's model saw")
        meta = completion.meta
        wanted = names or list(meta)
        sites: dict[str, Site] = {}
        for name in wanted:
            selector = meta[name].raw.get("selector") or _asked_selector(completion, name)
            try:
                site = reference.site(selector)
            except ValueError as exc:
                raise AssertionError(f"`{name}`: {exc}") from None
            if not reference.has_module(site.module_path):
                raise AssertionError(f"`{name}`: selector {selector!r} names no module of the reference model")
            sites[name] = site
        from capture_conformance.harness.protocol.values import candidate_sites

        asked: list[Site] = []
        for site in sites.values():
            asked.append(site)
            asked.extend(candidate_sites(site, reference.layout, reference.has_module))
        values = reference.values(prompt, ids, list(dict.fromkeys(asked)))
        temperature = completion.request.get("temperature")
        results, failures = [], []
        for name, site in sites.items():
            m = meta[name]
            tensor = self.runs.tensor(completion, name)
            capture_dtype = tensor.dtype.removeprefix("torch.")
            tolerance = tolerance_for(self.model_dtype, capture_dtype, self.override)
            own = {site: values[site], **{s: values[s] for s in candidate_sites(site, reference.layout,
                                                                                    reference.has_module)}}
            result = compare(name=name, selector=m.raw.get("selector", str(site.label)),
                             tokens=str(m.raw.get("tokens", "all")), capture_dtype=capture_dtype,
                             served=tensor.values, site=site, reference=own, prompt_len=len(prompt),
                             generated=len(ids), tolerance=tolerance,
                             temperature=float(temperature) if isinstance(temperature, (int, float)) else None,
                             layout=reference.layout)
            results.append(result)
            self._record(result, tolerance)
            if not result.ok:
                failures.append(result.message())
        if failures:
            raise AssertionError("; ".join(failures))
        return results

    def _record(self, result: Comparison, tolerance) -> None:
        test = (self.config.stash.get(_CURRENT, None) or "?")
        # One fact per comparison: xdist workers' facts are merged key by key in the controller.
        _record_fact(self.config, f"values:{test}:{result.name}", {**result.as_dict(), "test": test,
                                                                  "tolerance_source": tolerance.source,
                                                                  "model_dtype": tolerance.model_dtype})


_CURRENT = pytest.StashKey[str]()


def _asked_selector(completion: Completion, name: str) -> str:
    capture = completion.request.get("capture")
    for spec in (capture or {}).get("savepoints") or [{"name": "_logits", "selector": "logits"}]:
        if isinstance(spec, dict) and spec.get("name") == name:
            return spec["selector"]
        if spec == name:
            return spec
    raise AssertionError(f"`{name}`: activations_meta gives no selector and the request did not name it")


@pytest.fixture
def value_checks(value_reference: ReferenceStatus, capture_runs: CaptureRuns, ground_truth: GroundTruth,
                 server_model_dtype: str | None, pytestconfig: pytest.Config, request: pytest.FixtureRequest
                 ) -> ValueChecks:
    pytestconfig.stash[_CURRENT] = request.node.name
    return ValueChecks(value_reference, capture_runs, ground_truth, server_model_dtype,
                       pytestconfig.getoption("value_tolerance", None), pytestconfig)
