"""Documents from outside are parsed at one boundary: a typed value or a ``FerryError``, nothing else (issue #8).

Unit cases for each shape the issue lists, then hypothesis fuzzing of every parser and of the code that
uses their results (planning, conversion, platform choice, inspect views): for arbitrary JSON, and for
valid documents with one part replaced by arbitrary JSON, the only exception allowed is a ``FerryError``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness.images import build_image, build_multiarch
from worker.engine.inspect import go_json, oci_config_view
from worker.engine.manifest import convert_manifest, parse_manifest, pick_platform
from worker.engine.plan import CopyOptions, DestinationInfo, ResolvedImage, SourceManifest, plan_copy
from worker.registry import (
    Descriptor,
    FerryError,
    MalformedDocument,
    MediaType,
    Platform,
    check_config,
    load_json,
    parse_name_page,
)
from worker.registry._documents import MAX_DEPTH, parse_token_answer
from worker.registry._mediatype import guess_media_type, sniff_media_type

IMAGE = build_image("documents", layers=(300, 200))
INDEX = build_multiarch("documents-index", platforms=["linux/amd64", "linux/arm64"], layers=(100,))
OCI = MediaType.OCI_MANIFEST.value


def manifest_with(**changes: Any) -> bytes:
    obj = {**IMAGE.manifest_json, **changes}
    return json.dumps(obj).encode()


def index_with(**changes: Any) -> bytes:
    obj = {**INDEX.manifest_json, **changes}
    return json.dumps(obj).encode()


# -- the shapes from the issue ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "media_type", "message"),
    [
        (manifest_with(layers=[None]), OCI, "layers[0]: expected an object, got null"),
        (manifest_with(layers="sha256:abc"), OCI, "layers: expected a list, got a string"),
        (manifest_with(annotations=["a", "b"]), OCI, "annotations: expected an object of strings, got a list"),
        (manifest_with(annotations={"a": 1}), OCI, "annotations.a: expected a string, got a number"),
        (
            manifest_with(config={**IMAGE.manifest_json["config"], "size": 7e77}).replace(b"7e+77", b"1e400"),
            OCI,
            "config.size: expected a whole number, got a number",
        ),
        (manifest_with(config={**IMAGE.manifest_json["config"], "size": -1}), OCI, "config.size: -1 is out of range"),
        (manifest_with(config={**IMAGE.manifest_json["config"], "size": True}), OCI, "config.size: expected a whole"),
        (manifest_with(config={**IMAGE.manifest_json["config"], "digest": 5}), OCI, "config.digest: expected a string"),
        (manifest_with(config={**IMAGE.manifest_json["config"], "digest": "md5:x"}), OCI, "config.digest: unsupported"),
        (manifest_with(config=None), OCI, "config is missing"),
        (manifest_with(config=[]), OCI, "config: expected an object, got a list"),
        (manifest_with(schemaVersion="2"), OCI, "schemaVersion: expected a whole number"),
        (index_with(manifests=[None]), MediaType.OCI_INDEX.value, "manifests[0]: expected an object, got null"),
        (index_with(manifests={"a": 1}), MediaType.OCI_INDEX.value, "manifests: expected a list, got an object"),
        (
            index_with(manifests=[{**INDEX.manifest_json["manifests"][0], "platform": "linux/amd64"}]),
            MediaType.OCI_INDEX.value,
            "manifests[0].platform: expected an object, got a string",
        ),
        (b"[" * 100_000 + b"]" * 100_000, OCI, "nested too deeply"),
        (b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), OCI, "deeper than"),
        (b'{"schemaVersion": NaN}', OCI, "not valid JSON"),
        (b"\xff\xfe{", OCI, "not valid JSON"),
        (b"[]", OCI, "expected an object, got a list"),
        (b'{"schemaVersion":1,"fsLayers":[{"blobSum":null}]}', "", "fsLayers[0].blobSum is missing"),
    ],
)
def test_malformed_manifest_is_one_clear_error(raw: bytes, media_type: str, message: str) -> None:
    with pytest.raises(MalformedDocument) as info:
        parse_manifest(raw, media_type)
    text = str(info.value)
    assert text.startswith("malformed manifest") and message in text, text
    assert "\n" not in text


def test_well_formed_documents_parse_to_typed_values() -> None:
    m = parse_manifest(IMAGE.manifest, IMAGE.media_type)
    assert m.config == IMAGE.config_descriptor()
    assert [d.digest for d in m.layers] == [ly.digest for ly in IMAGE.layers]
    idx = parse_manifest(INDEX.manifest, INDEX.media_type)
    assert [d.platform for d in idx.manifests] == [Platform.parse("linux/amd64"), Platform.parse("linux/arm64")]
    assert parse_name_page(b'{"name":"a","tags":["1","2"]}', "tags", "tag list") == ["1", "2"]
    assert parse_name_page(b'{"tags":null}', "tags", "tag list") == []
    answer = parse_token_answer(b'{"access_token":"t","expires_in":300,"refresh_token":"r"}', "token answer")
    assert (answer.token, answer.expires_in, answer.refresh_token) == ("t", 300.0, "r")
    assert check_config(IMAGE.config)["architecture"] == "amd64"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"tags":[1,2]}', "tags[0]: expected a string, got a number"),
        (b'{"tags":"v1"}', "tags: expected a list, got a string"),
        (b'["v1"]', "expected an object, got a list"),
        (b"null", "expected an object, got null"),
        (b"<html>", "not valid JSON"),
    ],
)
def test_malformed_tag_list(raw: bytes, message: str) -> None:
    with pytest.raises(MalformedDocument, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_name_page(raw, "tags", "tag list")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"token":"t","expires_in":"soon"}', "expires_in: expected a finite number >= 0, got a string"),
        (b'{"token":"t","expires_in":[]}', "expires_in: expected a finite number >= 0, got a list"),
        (b'{"token":"t","expires_in":1e400}', "expires_in: expected a finite number >= 0, got a number"),
        (b'{"token":["t"]}', "token: expected a string, got a list"),
        (b'{"expires_in":60}', "no token"),
        (b"[]", "expected an object, got a list"),
    ],
)
def test_malformed_token_answer(raw: bytes, message: str) -> None:
    with pytest.raises(MalformedDocument, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_token_answer(raw, "token answer")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"config": {"Labels": ["a"]}}, "config.Labels: expected an object of strings"),
        ({"config": {"Env": "PATH=/"}}, "config.Env: expected a list"),
        ({"config": []}, "config: expected an object"),
        ({"rootfs": {"diff_ids": [None]}}, r"rootfs.diff_ids\[0\]: expected a string"),
        ({"history": [None]}, r"history\[0\]: expected an object"),
        ({"created": 5}, "created: expected a string"),
    ],
)
def test_malformed_config(config: dict[str, Any], message: str) -> None:
    with pytest.raises(MalformedDocument, match=message):
        check_config(json.dumps(config).encode())


# -- fuzzing -----------------------------------------------------------------------------------------------------

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.sampled_from(
        [
            str(IMAGE.config_digest),
            OCI,
            MediaType.OCI_INDEX.value,
            MediaType.DOCKER_MANIFEST.value,
            MediaType.OCI_LAYER_GZIP.value,
            "linux",
            "amd64",
        ]
    )
)
JSON = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)
MEDIA_TYPES = st.sampled_from(
    [
        "",
        OCI,
        MediaType.OCI_INDEX.value,
        MediaType.DOCKER_MANIFEST.value,
        MediaType.DOCKER_MANIFEST_LIST.value,
        MediaType.DOCKER_MANIFEST_V1_SIGNED.value,
    ]
)
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _replace_somewhere(doc: Any, path: list[int], value: Any) -> Any:
    """``doc`` with the node reached by following ``path`` (indexes into keys/items, wrapped) set to ``value``."""
    if not path or not isinstance(doc, dict | list) or not doc:
        return value
    step, rest = path[0], path[1:]
    if isinstance(doc, dict):
        key = sorted(doc)[step % len(doc)]
        return {**doc, key: _replace_somewhere(doc[key], rest, value)}
    i = step % len(doc)
    return [*doc[:i], _replace_somewhere(doc[i], rest, value), *doc[i + 1 :]]


MUTATED = st.builds(
    _replace_somewhere,
    st.sampled_from([IMAGE.manifest_json, INDEX.manifest_json, INDEX.children[0].manifest_json]),
    st.lists(st.integers(min_value=0, max_value=10), max_size=4),
    JSON,
)


def use_manifest(raw: bytes, media_type: str) -> None:
    """Everything Ferry does with a manifest it accepted: plan it, convert it, pick a platform."""
    m = parse_manifest(raw, media_type)
    m.blobs  # noqa: B018
    if m.is_index:
        try:
            pick_platform(m.manifests, Platform.parse("linux/amd64"))
        except FerryError:
            pass
    for target in ("oci", "v2s2"):
        try:
            convert_manifest(raw, m.media_type, target)
        except FerryError:
            pass
    resolved = ResolvedImage("docker://a.test/x:1", "docker://b.test/x:1", SourceManifest(raw, m.media_type))
    resolved.dest_info = DestinationInfo(store="docker://b.test", repository="x", is_registry=True)
    for fmt in (None, "oci", "v2s2"):
        try:
            plan_copy([resolved], CopyOptions(format=fmt))
        except FerryError:
            pass


@FUZZ
@given(doc=JSON | MUTATED, media_type=MEDIA_TYPES)
def test_fuzz_manifest_gives_a_typed_result_or_a_ferry_error(doc: Any, media_type: str) -> None:
    raw = json.dumps(doc).encode()
    try:
        use_manifest(raw, media_type)
    except FerryError:
        pass
    for sniff in (guess_media_type, lambda r: sniff_media_type(r, "x", media_type)):
        try:
            assert isinstance(sniff(raw), str)
        except FerryError:
            pass


@FUZZ
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_fuzz_bytes_give_a_typed_result_or_a_ferry_error(raw: bytes) -> None:
    for parse in (
        lambda: use_manifest(raw, ""),
        lambda: parse_name_page(raw, "tags", "tag list"),
        lambda: parse_token_answer(raw, "token answer"),
        lambda: check_config(raw),
    ):
        try:
            parse()
        except FerryError:
            pass


@FUZZ
@given(doc=JSON, key=st.sampled_from(["tags", "repositories"]))
def test_fuzz_name_pages(doc: Any, key: str) -> None:
    raw = json.dumps({key: doc} if isinstance(doc, list) else doc).encode()
    try:
        names = parse_name_page(raw, key, "tag list")
    except FerryError:
        return
    assert all(isinstance(n, str) for n in names)


@FUZZ
@given(doc=JSON | st.dictionaries(st.sampled_from(["token", "access_token", "expires_in", "refresh_token"]), JSON))
def test_fuzz_token_answers(doc: Any) -> None:
    try:
        answer = parse_token_answer(json.dumps(doc).encode(), "token answer")
    except FerryError:
        return
    assert isinstance(answer.token, str) and answer.token
    assert answer.expires_in is None or (isinstance(answer.expires_in, float) and answer.expires_in > 0)


CONFIG_MUTATED = st.builds(
    _replace_somewhere, st.just(IMAGE.config_json), st.lists(st.integers(min_value=0, max_value=10), max_size=4), JSON
)


@FUZZ
@given(doc=JSON | CONFIG_MUTATED)
def test_fuzz_configs_and_the_inspect_view(doc: Any) -> None:
    try:
        config = check_config(json.dumps(doc).encode())
    except FerryError:
        return
    go_json(oci_config_view(config))


@FUZZ
@given(
    doc=JSON | st.builds(_replace_somewhere, st.just(IMAGE.manifest_json["config"]), st.lists(st.integers(0, 5)), JSON)
)
def test_fuzz_descriptors(doc: Any) -> None:
    try:
        d = Descriptor.from_json(doc)
    except FerryError:
        return
    assert isinstance(d.size, int) and 0 <= d.size < 2**63
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in d.annotations)


def test_load_json_refuses_what_python_would_accept() -> None:
    for raw in (b"NaN", b"[Infinity]", b'{"a": -Infinity}'):
        with pytest.raises(MalformedDocument):
            load_json(raw, "document")
    assert load_json(b'{"a": [1, 2.5, "x", null]}', "document") == {"a": [1, 2.5, "x", None]}
