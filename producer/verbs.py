"""The read verbs and the credential verbs: inspect, list-tags, manifest-digest, delete, login, logout."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys

from worker.engine.inspect import go_json, host_platform, image_config, inspect_image, oci_config_view
from worker.engine.transports import ClientPool, ImageName, SideConfig, open_repository, open_source
from worker.engine.transports.registry import RegistrySource
from worker.registry import (
    Credentials,
    Digest,
    InvalidInput,
    NotFound,
    Reference,
    RegistryClient,
    check_config,
    get_login,
    remove_all_logins,
    remove_login,
    store_login,
)

from .options import side_config


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _wanted_platform(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    return host_platform(args.override_os, args.override_arch, args.override_variant)


def inspect(args: argparse.Namespace) -> int:
    name = ImageName.parse(args.image)
    side = side_config(args)
    pool = ClientPool()
    try:
        src = open_source(name, side, pool)
        with src:
            wanted = _wanted_platform(args)
            if args.config:
                raw_config = image_config(src, wanted)
                if args.raw:
                    sys.stdout.buffer.write(raw_config)
                    sys.stdout.flush()
                else:
                    _write(go_json(oci_config_view(check_config(raw_config))) + "\n")
                return 0
            if args.raw:
                raw, _mt = src.get_manifest(None)
                sys.stdout.buffer.write(raw)
                sys.stdout.flush()
                return 0
            ref_name = name.reference.name if name.reference is not None else None
            out = inspect_image(src, name=ref_name, tags=None, wanted=wanted)
            if getattr(args, "manifest_digest", None) == "sha512":
                import hashlib

                top, _mt = src.get_manifest(None)
                out["Digest"] = f"sha512:{hashlib.sha512(top).hexdigest()}"
            if name.reference is not None and not args.no_tags:
                # skopeo lists them at the name as given (not at a registries.conf mirror or rewrite)
                out["RepoTags"] = open_repository(name, side, pool).list_tags()
            if args.format:
                from .gotemplate import GoStruct, GoTime, render_inspect  # only here: not every start pays for it

                data = GoStruct(out)
                if isinstance(out.get("Created"), str):
                    data["Created"] = GoTime(out["Created"])
                _write(render_inspect(args.format, data))
            else:
                _write(go_json(out) + "\n")
            return 0
    finally:
        pool.close()


def list_tags(args: argparse.Namespace) -> int:
    name = ImageName.parse(args.repository)
    if name.transport == "docker-archive":
        _write(go_json({"Tags": _archive_tags(name)}) + "\n")
        return 0
    if name.transport != "docker":
        raise InvalidInput(f"list-tags reads docker:// repositories and docker-archive: files, not {name.transport}:")
    assert name.reference is not None
    ref = name.reference
    if ref.digest is not None or (
        ref.tag and not args.repository.endswith(":latest") and ":" in _last(args.repository)
    ):
        raise InvalidInput(f"invalid repository name {args.repository!r}: a repository takes no tag or digest")
    pool = ClientPool()
    try:
        tags = open_repository(name, side_config(args), pool).list_tags()
    finally:
        pool.close()
    _write(go_json({"Repository": ref.name, "Tags": tags}) + "\n")
    return 0


def _archive_tags(name: ImageName) -> list[str]:
    """skopeo's list-tags for docker-archive: every item's RepoTags (normalised), ``@N`` for an untagged one."""
    from worker.engine.transports.docker_archive import DockerArchiveSource, parse_docker_archive_spec

    path, ref = parse_docker_archive_spec(name.details)
    if ref is not None:
        raise InvalidInput(f"list-tags {name}: a docker-archive is listed by its path alone, without :{ref}")
    tags: list[str] = []
    src = DockerArchiveSource(path, None)
    try:
        for i, item in enumerate(src.items):
            found = []
            for tag in item.get("RepoTags") or []:
                try:
                    found.append(str(Reference.parse(str(tag), default_tag=False)))
                except InvalidInput as exc:
                    raise InvalidInput(f"{name}: invalid tag {tag!r} in manifest.json: {exc}") from None
            tags += found or [f"@{i}"]
    finally:
        src.close()
    return tags


def _last(text: str) -> str:
    return text.rsplit("/", 1)[-1]


def manifest_digest(args: argparse.Namespace) -> int:
    try:
        with open(args.manifest, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise InvalidInput(f"cannot read manifest {args.manifest}: {exc.strerror}") from None
    _write(str(manifest_digest_of(raw)) + "\n")
    return 0


def manifest_digest_of(raw: bytes) -> Digest:
    """The digest of a manifest; for a signed schema 1 manifest, of its payload without signatures.

    Like skopeo, anything that is not a signed schema 1 manifest (even bytes that are not JSON) is hashed as is.
    """
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return Digest.of(raw)
    if isinstance(obj, dict) and obj.get("schemaVersion") == 1 and obj.get("signatures"):
        import base64

        try:
            sig = obj["signatures"][0]
            protected = sig.get("protected", "")
            header = json.loads(base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4)))
            length = int(header["formatLength"])
            tail = base64.urlsafe_b64decode(header["formatTail"] + "=" * (-len(header["formatTail"]) % 4))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
            raise InvalidInput("malformed signed schema 1 manifest: cannot read its signature header") from None
        if not 0 < length <= len(raw):
            raise InvalidInput("malformed signed schema 1 manifest: formatLength out of range")
        return Digest.of(raw[:length] + tail)
    return Digest.of(raw)


def delete(args: argparse.Namespace) -> int:
    name = ImageName.parse(args.image)
    if name.transport != "docker":
        raise InvalidInput(f"delete supports only docker:// images, not {name.transport}:")
    ref = name.reference
    assert ref is not None
    pool = ClientPool()
    try:
        repository = open_repository(name, side_config(args), pool)  # registries.conf: blocked, insecure
        assert isinstance(repository, RegistrySource)
        client = repository.client
        digest = ref.digest
        if digest is None:
            desc = client.head_manifest(ref.repository, ref.identifier)
            if desc is None:
                raise NotFound(f"deleting {ref}: manifest unknown (no such tag)", status=404)
            digest = desc.digest
        client.delete_manifest(ref.repository, digest)
    finally:
        pool.close()
    return 0


def _registry_arg(text: str) -> str:
    """The key under which credentials are stored: ``host[:port][/namespace]`` without scheme."""
    for prefix in ("https://", "http://", "docker://"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    return text.rstrip("/")


def _compat_auth_file(args: argparse.Namespace, registry: str | None) -> str | None:
    """``--compat-auth-file PATH``: a Docker config.json to edit instead (containers/common's rules)."""
    path: str | None = getattr(args, "compat_auth_file", None)
    if not path:
        return None
    if args.authfile:
        raise InvalidInput(
            "options for paths to the credential file and to the Docker-compatible credential file can not be"
            " set simultaneously"
        )
    if registry and "/" in registry:
        raise InvalidInput(
            f'Credentials cannot be recorded in Docker-compatible format with namespaced key "{registry}"'
        )
    return path


def _docker_hub_key(path: str) -> None:
    """In a Docker config.json, Docker Hub's key is ``https://index.docker.io/v1/`` (as Docker writes it)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    auths = data.get("auths")
    if isinstance(auths, dict) and "docker.io" in auths:
        auths["https://index.docker.io/v1/"] = auths.pop("docker.io")
        from worker.registry._fs import atomic_write

        atomic_write(path, [(json.dumps(data, indent="\t") + "\n").encode()], mode=0o600)


def login(args: argparse.Namespace) -> int:
    registry = _registry_arg(args.registry)
    compat = _compat_auth_file(args, registry)
    if compat:
        args.authfile = compat
    if args.get_login:
        user = get_login(registry, authfile=args.authfile)
        if user is None:
            raise InvalidInput(f"not logged into {registry}")
        _write(user + "\n")
        return 0
    if args.password_stdin and args.password:
        raise InvalidInput("--password and --password-stdin cannot be used together")
    username = args.username
    password = args.password
    if args.password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
        if not username:
            raise InvalidInput("--username must be given with --password-stdin")
    if not username:
        if not sys.stdin.isatty():
            raise InvalidInput("a username is required: use --username")
        username = input("Username: ")
    if password is None:
        if not sys.stdin.isatty():
            raise InvalidInput("a password is required: use --password or --password-stdin")
        password = getpass.getpass("Password: ")
    if not username or not password:
        raise InvalidInput("username and password must not be empty")
    creds = Credentials(username=username, password=password)
    host = registry.split("/", 1)[0]
    ref = Reference.parse(f"{host}/login-check")
    side = SideConfig(tls_verify=args.tls_verify, cert_dir=args.cert_dir, credentials=creds)
    client = RegistryClient(ref.registry, credentials=creds, options=side.client_options())
    try:
        client.ping()
    finally:
        client.close()
    path = store_login(registry, creds, authfile=args.authfile)
    if compat and registry in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        _docker_hub_key(str(path))
    if args.verbose:
        print(f"Used: {path}", file=sys.stderr)
    _write("Login Succeeded!\n")
    return 0


def logout(args: argparse.Namespace) -> int:
    compat = _compat_auth_file(args, _registry_arg(args.registry) if args.registry else None)
    if compat:
        args.authfile = compat
    authfile = args.authfile or os.environ.get("REGISTRY_AUTH_FILE")
    if authfile and not os.path.exists(authfile):
        # skopeo (containers/common CheckAuthFile): a named auth file must exist
        raise InvalidInput(f"checking authfile: stat {authfile}: no such file or directory")
    if args.all:
        if args.registry:
            raise InvalidInput("--all takes no registry")
        remove_all_logins(authfile=args.authfile)
        _write("Removed login credentials for all registries\n")
        return 0
    if not args.registry:
        raise InvalidInput("a registry is required (or --all)")
    registry = _registry_arg(args.registry)
    if not remove_login(registry, authfile=args.authfile):
        raise InvalidInput(f"not logged into {registry}")
    _write(f"Removed login credentials for {registry}\n")
    return 0


LAYERS_DEPRECATED = "DEPRECATED: ferry layers is deprecated in favor of ferry copy"


def layers(args: argparse.Namespace) -> int:
    """skopeo's deprecated ``layers IMAGE [LAYER...]``: the image's layers and config (or the LAYERs named) and
    its manifest, into a new ``layers-*`` directory here, in the ``dir:`` layout."""
    import tempfile

    from worker.engine.inspect import resolve_image
    from worker.engine.manifest import parse_manifest
    from worker.engine.transports.dir import DirDestination

    print(LAYERS_DEPRECATED, file=sys.stderr)
    name = ImageName.parse(args.image)
    pool = ClientPool()
    try:
        with open_source(name, side_config(args), pool) as src:
            _top, _top_type, raw, media_type = resolve_image(src, _wanted_platform(args))
            m = parse_manifest(raw, media_type)
            if m.is_index:
                raise InvalidInput(f"{name}: no image for this platform in the index")
            known = {str(d.digest): d for d in [*m.layers, *([m.config] if m.config is not None else [])]}
            wanted = []
            for text in args.layers:
                digest = str(Digest.parse(text if text.startswith("sha256:") else f"sha256:{text}"))
                if digest not in known:
                    # skopeo would fetch any blob by digest; Ferry reads only blobs whose size the manifest gives
                    raise InvalidInput(f"{digest}: not a layer or the config of {name}")
                wanted.append(known[digest])
            if not args.layers:
                wanted = list({str(d.digest): d for d in m.layers}.values())
                wanted += [m.config] if m.config is not None else []
            dest = DirDestination(tempfile.mkdtemp(prefix="layers-", dir="."))
            try:
                for desc in wanted:
                    with src.open_blob(desc) as chunks:
                        dest.put_blob(desc, chunks)
                dest.put_manifest(raw, media_type)
                dest.commit()
            finally:
                dest.close()
    finally:
        pool.close()
    return 0
