"""Hostile and careless input, generated (hypothesis), against every surface that reads it: the endpoint, the
config loader, the PerturbQA CSV loader, the answer parser, and JSONL traces/predictions.

The contract pinned here: bad input ends in a clear error of the surface's own kind (a 4xx JSON error body
with a request id; a SynthpertError naming the file, line, key or column), never an unhandled exception, a
500 or a traceback, and never a silent loss or a guessed answer. Each test counts the inputs it tried;
with SYNTHPERT_ADVERSARIAL_COUNTS=FILE the counts per surface are written there as JSON (nothing is printed).
"""

from __future__ import annotations

import json
import os
import string
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from synthpert.answer import LABELS, LENIENT, MODES, STRICT, parse_answer
from synthpert.errors import SynthpertError

COUNTS: Counter = Counter()
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _write_counts():
    yield
    target = os.environ.get("SYNTHPERT_ADVERSARIAL_COUNTS")
    if target:
        Path(target).write_text(json.dumps(dict(sorted(COUNTS.items())), indent=2))


json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**18, max_value=10**40)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


# ---------------------------------------------------------------------------------------------------------
# Endpoint (in-process, stand-in predictor, an API key set)

KEY = "adv-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
VALID = {
    "/v1/predict": {"cell_line": "k562", "perturbation": "MYC", "gene": "GAPDH", "n_samples": 1},
    "/v1/predict/batch": {"items": [{"cell_line": "k562", "perturbation": "MYC", "gene": "GAPDH"}], "n_samples": 1},
    "/v1/chat/completions": {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 4, "temperature": 0, "n": 1},
}
routes = st.sampled_from(sorted(VALID))


@pytest.fixture(scope="module")
def api():
    from _fake_predictor import FakePredictor
    from starlette.testclient import TestClient

    from synthpert.config.serve import ServeSettings
    from synthpert.serve import create_app

    os.environ["SYNTHPERT_ADV_KEY"] = KEY
    try:
        app = create_app(FakePredictor(), ServeSettings(api_key_env="SYNTHPERT_ADV_KEY", served_name="fake-model"))
    finally:
        del os.environ["SYNTHPERT_ADV_KEY"]
    # raise_server_exceptions: anything that escaped the app's own handling would fail the test loudly
    with TestClient(app, raise_server_exceptions=True) as client:
        yield client


def post_raw(api, path: str, content: bytes, headers: dict | None = None):
    COUNTS["endpoint"] += 1
    return api.post(path, content=content, headers=headers or AUTH)


def assert_clean(r, ok_allowed: bool = True) -> None:
    """A 2xx (when the input happened to be valid) or a 4xx in the error shape; never a 500 or a traceback."""
    assert r.status_code < 500, r.text
    assert "Traceback" not in r.text and KEY not in r.text
    if r.status_code < 300:
        assert ok_allowed, r.text
        return
    assert 400 <= r.status_code < 500
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code", "request_id"} and err["message"]
    assert err["request_id"] == r.headers["x-request-id"]


@given(routes, st.binary(max_size=400))
@FAST
def test_endpoint_malformed_bodies_are_4xx(api, path, body):
    assert_clean(post_raw(api, path, body), ok_allowed=False)


@given(routes, st.data())
@FAST
def test_endpoint_wrong_types_and_extra_fields_are_4xx_naming_them(api, path, data):
    body = json.loads(json.dumps(VALID[path]))
    target = body["items"][0] if path.endswith("batch") and data.draw(st.booleans()) else body
    field = data.draw(st.sampled_from([*target, "unexpected_field"]))
    target[field] = data.draw(json_values)
    r = post_raw(api, path, json.dumps(body).encode())  # NaN / Infinity and lone surrogates as Python writes them
    assert_clean(r)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert field in (err["param"] or "").split(".") or field in err["message"], (field, err)


@given(routes, st.integers(min_value=50, max_value=60_000), st.sampled_from(["[", '{"a":', '{"items":[']))
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_endpoint_deep_nesting_is_4xx(api, path, depth, opener):
    assert_clean(post_raw(api, path, (opener * depth).encode()), ok_allowed=False)


@given(routes, st.sampled_from(["n_samples", "n", "max_tokens", "temperature", "top_p", "seed",
                                "max_completion_tokens"]),
       st.sampled_from(["9" * 30, "9" * 5000, "-" + "9" * 40, "1e999", "-1e999", "NaN", "Infinity", "1e-999",
                        "0.0000000000000000000001", "18446744073709551616"]))
@FAST
def test_endpoint_huge_and_odd_numbers_are_4xx_or_clamped(api, path, field, number):
    body = json.dumps(VALID[path])[:-1] + f', "{field}": {number}}}'
    assert_clean(post_raw(api, path, body.encode()))


control_or_exotic = st.text(alphabet=st.characters(codec=None, blacklist_categories=()), min_size=1, max_size=30)


@given(st.sampled_from(["cell_line", "perturbation", "gene"]), control_or_exotic)
@FAST
def test_endpoint_symbols_with_control_chars_or_any_unicode_are_422_or_valid(api, field, value):
    body = {**VALID["/v1/predict"], field: value}
    r = post_raw(api, "/v1/predict", json.dumps(body).encode())
    assert_clean(r)
    import re

    from synthpert.schema import SYMBOL_PATTERN

    if not re.fullmatch(SYMBOL_PATTERN, value.strip()) or len(value.strip()) > 64:
        assert r.status_code == 422 and r.json()["error"]["param"] == field


@given(control_or_exotic, st.sampled_from(["system", "user", "assistant", "root", ""]))
@FAST
def test_endpoint_chat_content_in_any_unicode_never_500(api, content, role):
    body = {**VALID["/v1/chat/completions"], "messages": [{"role": role, "content": content}]}
    assert_clean(post_raw(api, "/v1/chat/completions", json.dumps(body).encode()))


@pytest.mark.parametrize("field", ["model", "content"])
def test_endpoint_lone_surrogates_are_422_not_500(api, field):
    """\\ud800 is valid JSON but no valid text: a tokenizer or the UTF-8 error body would fail on it (a 500)."""
    body = json.loads(json.dumps(VALID["/v1/chat/completions"]))
    if field == "model":
        body["model"] = "fake\ud800"
    else:
        body["messages"][0]["content"] = "hi \udfff there"
    r = post_raw(api, "/v1/chat/completions", json.dumps(body).encode())
    assert_clean(r, ok_allowed=False)
    assert r.status_code == 422 and field in r.json()["error"]["param"]


@given(routes, st.one_of(st.none(), st.text(alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=60),
                         st.just(f"Bearer {KEY[:-1]}"), st.just(f"Bearer {KEY}x"), st.just(f"Basic {KEY}"),
                         st.just(KEY), st.just(f"Bearer  {KEY}")))
@FAST
def test_endpoint_missing_or_wrong_key_is_401_without_reading_the_body(api, path, auth):
    assume(auth != f"Bearer {KEY}")
    headers = {"content-type": "application/json"}
    if auth is not None:
        headers["Authorization"] = auth
    r = post_raw(api, path, json.dumps(VALID[path]).encode(), headers)
    assert_clean(r, ok_allowed=False)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@given(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       st.text(alphabet=string.ascii_letters + string.digits + "/-._~%", max_size=40))
@FAST
def test_endpoint_any_method_and_path_answers_json(api, method, path):
    COUNTS["endpoint"] += 1
    r = api.request(method, "/" + path.lstrip("/"), headers=AUTH)
    assert r.status_code < 500
    if method != "HEAD" and r.status_code >= 400:
        assert_clean(r)


def test_endpoint_valid_requests_still_answer_200(api):
    """The control for every test above: the same client, key and bodies are accepted when well-formed."""
    for path, body in VALID.items():
        r = post_raw(api, path, json.dumps(body).encode())
        assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------------------
# Config loader


def _load(path: Path):
    from synthpert.config import load_section
    from synthpert.config.run import RunConfig
    from synthpert.config.train import TrainConfig

    for model, section in ((RunConfig, None), (TrainConfig, "train")):
        COUNTS["config"] += 1
        try:
            load_section(model, section, path)
        except SynthpertError as e:
            assert str(e) and "Traceback" not in str(e)


@given(st.text(max_size=300))
@FAST
def test_config_random_yaml_text_is_loaded_or_a_synthpert_error(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _load(path)


@given(st.dictionaries(st.sampled_from(["name", "seed", "data", "train", "eval", "teacher", "judge", "eval_sets",
                                        "tiny", "x"]), json_values, max_size=5))
@FAST
def test_config_random_structures_are_loaded_or_a_synthpert_error(tmp_path, raw):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    _load(path)


def _mapping_paths(node, prefix=()):
    if isinstance(node, dict):
        yield prefix
        for k, v in node.items():
            yield from _mapping_paths(v, (*prefix, k))


QUICKSTART = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
QUICKSTART_PATHS = list(_mapping_paths(QUICKSTART))


@given(st.sampled_from(QUICKSTART_PATHS), st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True))
@FAST
def test_config_an_unknown_key_at_any_level_is_named_never_dropped(tmp_path, where, key):
    from synthpert.config import load_section
    from synthpert.config.run import RunConfig

    raw = json.loads(json.dumps(QUICKSTART))
    node = raw
    for part in where:
        node = node[part]
    key = f"zz{key}"
    node[key] = 1
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    COUNTS["config"] += 1
    try:
        cfg = load_section(RunConfig, None, path)
    except SynthpertError as e:
        dotted = ".".join((*map(str, where), key))
        # a settings section says "unknown key"; a mapping of named entries (eval_sets) names the bad entry
        assert f"unknown key '{dotted}'" in str(e) or f"- {dotted}: " in str(e), str(e)
        return
    kept = cfg.model_dump(mode="json")  # a free-form mapping (eval_sets, client...) keeps it: never silently lost
    for part in where:
        kept = kept[part]
    assert kept[key] == 1


@given(st.sampled_from([p for p in QUICKSTART_PATHS if p]), st.data())
@FAST
def test_config_wrong_types_anywhere_are_loaded_or_a_synthpert_error(tmp_path, where, data):
    raw = json.loads(json.dumps(QUICKSTART))
    node = raw
    for part in where[:-1]:
        node = node[part]
    node[where[-1]] = data.draw(json_values)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    _load(path)


@given(st.lists(st.text(max_size=30), max_size=4))
@FAST
def test_config_random_overrides_are_applied_or_a_synthpert_error(tmp_path, overrides):
    from synthpert.config import load_section
    from synthpert.config.train import TrainConfig

    COUNTS["config"] += 1
    try:
        load_section(TrainConfig, "train", None, overrides)
    except SynthpertError as e:
        assert str(e)


# ---------------------------------------------------------------------------------------------------------
# PerturbQA CSV loader

_symbols = st.from_regex(r"[A-Z][A-Z0-9]{1,5}", fullmatch=True)
_pairs = st.lists(st.tuples(_symbols, _symbols, st.sampled_from(["up", "down", "none"]),
                            st.sampled_from(["train", "test"])), min_size=1, max_size=12,
                  unique_by=lambda t: (t[0], t[1]))


def _csvs(pairs) -> tuple[str, str]:
    de = ["pert,gene,label,split"] + [f"{p},{g},{int(k != 'none')},{s}" for p, g, k, s in pairs]
    d = ["pert,gene,label,split"] + [f"{p},{g},{int(k == 'up')},{s}" for p, g, k, s in pairs if k != "none"]
    return "\n".join(de) + "\n", "\n".join(d) + "\n"


def _load_line(folder: Path, de: str | bytes, d: str | bytes):
    from synthpert.dataset import load_cell_line

    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("k562-de.csv", de), ("k562-dir.csv", d)):
        (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    COUNTS["csv"] += 1
    return load_cell_line(folder, "k562")


def _expected(pairs) -> set:
    names = {"up": LABELS[0], "down": LABELS[1], "none": LABELS[2]}
    return {(p, g, names[k], s) for p, g, k, s in pairs}


def _rows(cell) -> set:
    return set(cell.rows[["pert", "gene", "label", "split"]].itertuples(index=False, name=None))


@given(_pairs, st.booleans(), st.booleans())
@FAST
def test_csv_bom_and_crlf_load_the_same_rows(tmp_path_factory, pairs, bom, crlf):
    de, d = _csvs(pairs)
    if crlf:
        de, d = de.replace("\n", "\r\n"), d.replace("\n", "\r\n")
    if bom:
        de, d = "\ufeff" + de, "\ufeff" + d
    assert _rows(_load_line(tmp_path_factory.mktemp("csv"), de, d)) == _expected(pairs)


@given(_pairs, st.sampled_from(["pert", "gene", "label", "split"]), st.sampled_from(["de", "dir"]))
@FAST
def test_csv_a_missing_column_is_named(tmp_path_factory, pairs, column, which):
    de, d = _csvs(pairs)
    text = de if which == "de" else d
    lines = [",".join(c for c, _ in zip(line.split(","), "pert,gene,label,split".split(",")) if _ != column)
             for line in text.splitlines()]
    text = "\n".join(lines) + "\n"
    with pytest.raises(SynthpertError, match=rf"lacks column\(s\) \['{column}'\]"):
        _load_line(tmp_path_factory.mktemp("csv"), *((text, d) if which == "de" else (de, text)))


@given(_pairs, st.one_of(st.sampled_from(["2", "-1", "yes", "true", "0.5", "", "up", "1;0"]),
                         st.text(alphabet=string.ascii_letters + string.digits + ".-", min_size=1, max_size=6)))
@FAST
def test_csv_a_wrong_label_value_is_named_with_its_line(tmp_path_factory, pairs, bad):
    assume(bad.strip() not in ("0", "1", "0.0", "1.0", "00", "01", "-0", "1.", "0.", "+1", "+0", ".0", "1.00"))
    try:
        assume(float(bad) not in (0.0, 1.0))
    except ValueError:
        pass
    de, d = _csvs(pairs)
    lines = de.splitlines()
    p, g, _, s = pairs[-1]
    lines[-1] = f"{p},{g},{bad},{s}"
    with pytest.raises(SynthpertError, match=rf"label must be 0 or 1, found .* at line {len(lines)}"):
        _load_line(tmp_path_factory.mktemp("csv"), "\n".join(lines) + "\n", d)


@given(_pairs, st.data())
@FAST
def test_csv_a_duplicated_row_is_an_error_naming_the_pair(tmp_path_factory, pairs, data):
    de, d = _csvs(pairs)
    lines = de.splitlines()
    row = data.draw(st.sampled_from(lines[1:]))
    lines.insert(data.draw(st.integers(1, len(lines))), row)
    p, g = row.split(",")[:2]
    with pytest.raises(SynthpertError, match=rf"\({p}, {g}\) appears more than once"):
        _load_line(tmp_path_factory.mktemp("csv"), "\n".join(lines) + "\n", d)


@given(_pairs, st.sampled_from(["drop_dir", "orphan_dir", "split_dir"]))
@FAST
def test_csv_a_de_dir_mismatch_is_an_error_naming_the_pair(tmp_path_factory, pairs, how):
    de_pairs = [t for t in pairs if t[2] != "none"]
    assume(de_pairs)
    de, d = _csvs(pairs)
    p, g, k, s = de_pairs[0]
    if how == "drop_dir":
        d = "\n".join(x for x in d.splitlines() if not x.startswith(f"{p},{g},")) + "\n"
        match = rf"\({p}, {g}\) is DE in k562-de.csv but has no row in k562-dir.csv"
    elif how == "orphan_dir":
        d += "ZZORPHAN,ZZGENE,1,train\n"
        match = r"\(ZZORPHAN, ZZGENE\) has a direction in k562-dir.csv but is not DE"
    else:
        other = "test" if s == "train" else "train"
        d = d.replace(f"{p},{g},{int(k == 'up')},{s}", f"{p},{g},{int(k == 'up')},{other}")
        match = rf"\({p}, {g}\) has split '{s}' in -de but '{other}' in -dir"
    with pytest.raises(SynthpertError, match=match):
        _load_line(tmp_path_factory.mktemp("csv"), de, d)


@given(st.sampled_from([b"", b"\n", b"\r\n", b"\xef\xbb\xbf", b"   \n\n"]), st.sampled_from(["de", "dir"]))
@FAST
def test_csv_an_empty_file_is_a_clear_error(tmp_path_factory, content, which):
    de, d = _csvs([("MYC", "GAPDH", "up", "train")])
    with pytest.raises(SynthpertError, match=r"k562-(de|dir)\.csv"):
        _load_line(tmp_path_factory.mktemp("csv"), *((content, d) if which == "de" else (de, content)))


@given(st.binary(max_size=300))
@FAST
def test_csv_random_bytes_load_or_fail_with_a_synthpert_error(tmp_path_factory, blob):
    de, d = _csvs([("MYC", "GAPDH", "up", "train")])
    try:
        _load_line(tmp_path_factory.mktemp("csv"), blob, d)
    except SynthpertError as e:
        assert "k562" in str(e)


def test_csv_header_only_loads_as_an_empty_line(tmp_path):
    """Documented handling: a line with no rows loads (0 rows); `data build` then refuses an empty train split
    (tests/test_data.py::test_empty_test_split_round_trips_and_empty_train_split_fails_at_build)."""
    assert len(_load_line(tmp_path, "pert,gene,label,split\n", "pert,gene,label,split\n").rows) == 0


# ---------------------------------------------------------------------------------------------------------
# Answer parser

_label_words = st.sampled_from(["upregulated", "downregulated", "not differentially expressed", "up", "down",
                                "Up-regulated", "DOWNREGULATED", "no change", "unchanged", "increased",
                                "decreased", "not DE"])
_tag_open = st.sampled_from(["<answer>", "<ANSWER>", "< answer >", "<Answer>"])
_tag_close = st.sampled_from(["</answer>", "</ANSWER>", "< / answer >", "</Answer>"])
_filler = st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=40)


@given(st.text(max_size=400))
@settings(max_examples=150, deadline=None)
def test_answer_random_text_never_raises(text):
    for mode in MODES:
        COUNTS["answer"] += 1
        p = parse_answer(text, mode)
        assert (p.label is None) == (p.error is not None) and p.label in (None, *LABELS)


@given(st.lists(st.one_of(_filler, _label_words, _tag_open, _tag_close, st.sampled_from(["<think>", "</think>",
                                                                                         "\n", "Answer: "])),
                max_size=14).map("".join))
@settings(max_examples=150, deadline=None)
def test_answer_tag_soup_never_raises_and_strict_implies_lenient(text):
    """Whatever the strict parser accepts, the lenient one reads the same way (lenient only adds leniency)."""
    COUNTS["answer"] += 2
    strict, lenient = parse_answer(text, STRICT), parse_answer(text, LENIENT)
    if strict.label is not None:
        assert lenient.label == strict.label, (text, strict, lenient)


def _label_of(word: str) -> str:
    from synthpert.answer import normalise_label

    return normalise_label(word)


@given(_filler, _tag_open, _label_words, _tag_close, _filler, _tag_open, _label_words, _tag_close, _filler)
@settings(max_examples=150, deadline=None)
def test_answer_two_disagreeing_answer_blocks_in_any_spelling_never_parse(a, o1, w1, c1, b, o2, w2, c2, c):
    assume(_label_of(w1) != _label_of(w2))
    text = f"{a}{o1}{w1}{c1}{b}{o2}{w2}{c2}{c}"
    for mode in MODES:
        COUNTS["answer"] += 1
        assert parse_answer(text, mode).label is None, (mode, text)


@given(_filler, _label_words, st.sampled_from([" or ", " and ", "/", " vs ", ", maybe ", " not "]), _label_words,
       st.booleans())
@settings(max_examples=100, deadline=None)
def test_answer_one_block_naming_two_labels_never_parses(reasoning, w1, joiner, w2, tagged):
    body = f"{w1}{joiner}{w2}"
    text = f"<think>{reasoning}</think>\n" + (f"<answer>{body}</answer>" if tagged else f"Answer: {body}")
    for mode in MODES:
        COUNTS["answer"] += 1
        assert parse_answer(text, mode).label is None, (mode, text)


@given(_filler, st.sampled_from(["not upregulated", "not downregulated", "possibly upregulated", "up?",
                                 "either", "unknown", "n/a", "upregulated or not", "likely down"]))
@settings(max_examples=100, deadline=None)
def test_answer_hedged_or_negated_answers_never_parse(reasoning, hedge):
    for text in (f"<think>{reasoning}</think><answer>{hedge}</answer>", f"{reasoning}\nFinal answer: {hedge}"):
        for mode in MODES:
            COUNTS["answer"] += 1
            assert parse_answer(text, mode).label is None, (mode, text)


# ---------------------------------------------------------------------------------------------------------
# JSONL traces and predictions


def _prediction(i: int) -> dict:
    from synthpert.schema import Prediction

    return Prediction(id=f"k562:P{i}:G{i}", cell_line="k562", perturbation=f"P{i}", gene=f"G{i}",
                      raw_text="<answer>upregulated</answer>", label_strict=LABELS[0],
                      label_lenient=LABELS[0]).model_dump(mode="json")


@given(st.integers(1, 8), st.data())
@FAST
def test_jsonl_a_torn_last_line_is_skipped_and_reported(tmp_path_factory, caplog, n, data):
    from synthpert.schema import Prediction, read_jsonl

    lines = [json.dumps(_prediction(i), ensure_ascii=False) for i in range(n + 1)]
    torn = lines[-1].encode()[: data.draw(st.integers(1, len(lines[-1].encode()) - 1))]
    path = tmp_path_factory.mktemp("jsonl") / "predictions.jsonl"
    path.write_bytes(("\n".join(lines[:-1]) + "\n").encode() + torn)
    COUNTS["jsonl"] += 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="synthpert.schema"):
        got = list(read_jsonl(path, Prediction))
    assert [p.id for p in got] == [f"k562:P{i}:G{i}" for i in range(n)]  # everything before it, intact
    assert any(f"{path}:{n + 1}" in r.getMessage() and "torn" in r.getMessage() for r in caplog.records)


@given(st.integers(2, 8), st.data(), st.sampled_from([b"{not json", b"\xff\xfe garbage", b'{"id": 1}', b"[]",
                                                      b'{"id": "x"', b"null"]))
@FAST
def test_jsonl_a_corrupt_middle_line_is_an_error_naming_file_and_line(tmp_path_factory, n, data, bad):
    from synthpert.schema import Prediction, read_jsonl

    lines = [json.dumps(_prediction(i)).encode() for i in range(n)]
    at = data.draw(st.integers(0, n - 1))
    lines[at] = bad
    path = tmp_path_factory.mktemp("jsonl") / "traces.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    COUNTS["jsonl"] += 1
    with pytest.raises(SynthpertError, match=rf"{path}:{at + 1}: "):
        list(read_jsonl(path, Prediction))


@given(st.binary(max_size=300))
@FAST
def test_jsonl_random_bytes_read_or_fail_with_a_synthpert_error(tmp_path_factory, blob):
    from synthpert.schema import read_jsonl

    path = tmp_path_factory.mktemp("jsonl") / "x.jsonl"
    path.write_bytes(blob)
    COUNTS["jsonl"] += 1
    try:
        list(read_jsonl(path))
    except SynthpertError as e:
        assert str(path) in str(e)


@given(st.integers(1, 6), st.data())
@FAST
def test_jsonl_eval_resume_keeps_every_whole_record_and_appends_on_a_fresh_line(tmp_path_factory, caplog, n, data):
    """The predictions file after a kill: a torn tail is cut (and reported), a complete last record that only
    lacks its newline is kept, and records appended next start on their own line."""
    from synthpert.evaluate import append_predictions, read_predictions, repair_tail
    from synthpert.schema import Prediction

    lines = [json.dumps(_prediction(i)) for i in range(n)]
    whole_tail = data.draw(st.booleans())
    tail = lines[-1] if whole_tail else lines[-1][: data.draw(st.integers(1, len(lines[-1]) - 1))]
    path = tmp_path_factory.mktemp("ev") / "predictions.jsonl"
    path.write_text("".join(x + "\n" for x in lines[:-1]) + tail)
    COUNTS["jsonl"] += 1
    with caplog.at_level("WARNING", logger="synthpert.evaluate"):
        repair_tail(path)
    append_predictions(path, [Prediction.model_validate(_prediction(99))])
    ids = list(read_predictions(path))
    assert ids == [f"k562:P{i}:G{i}" for i in range(n if whole_tail else n - 1)] + ["k562:P99:G99"]
    assert whole_tail or any("torn" in r.getMessage() for r in caplog.records)
