"""Seed a registry with a deterministic multi-arch image: ``python -m scripts.seed HOST REPO:TAG``."""

from __future__ import annotations

import sys

from tests.harness.images import build_multiarch, push_index


def main() -> None:
    host, name = sys.argv[1], sys.argv[2]
    repo, _, tag = name.partition(":")
    index = build_multiarch("demo", platforms=["linux/amd64", "linux/arm64"], layers=[200_000, 50_000, 1_000])
    push_index(f"http://{host}", repo, tag or "latest", index)
    print(f"pushed {host}/{repo}:{tag or 'latest'} {index.digest}")


if __name__ == "__main__":
    main()
