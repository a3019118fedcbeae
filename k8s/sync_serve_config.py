#!/usr/bin/env python3
"""Keep the RayService's serveConfigV2 in step with serve/config.yaml.

serve/config.yaml is the one source of the tagging application's Serve config
(`serve run serve/config.yaml` uses it locally). This script copies its
`applications:` into

  k8s/base/rayservice-tagging.yaml              serveConfigV2 of the base RayService
  k8s/overlays/gpu/rayservice-serve-config.yaml the GPU overlay's patch, where each
                                                 Tagger replica also takes one GPU

http_options are not copied: they bind 127.0.0.1 for local runs, and in-cluster
KubeRay's defaults apply.

  python k8s/sync_serve_config.py          rewrite the two files
  python k8s/sync_serve_config.py --check  exit 1 if either is out of date
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = REPO_ROOT / "serve" / "config.yaml"
RAYSERVICE = REPO_ROOT / "k8s" / "base" / "rayservice-tagging.yaml"
GPU_PATCH = REPO_ROOT / "k8s" / "overlays" / "gpu" / "rayservice-serve-config.yaml"

RAYSERVICE_NAME = "topro-tagging"
# Ray actor options the GPU overlay adds, per deployment name.
GPU_ACTOR_OPTIONS = {"Tagger": {"num_gpus": 1}}

GENERATED_NOTE = "# Generated from serve/config.yaml by k8s/sync_serve_config.py: edit that file, then rerun it."


def load_applications(path: Path = SERVE_CONFIG) -> list[dict]:
    return yaml.safe_load(path.read_text())["applications"]


def gpu_applications(applications: list[dict]) -> list[dict]:
    """The applications as the GPU overlay deploys them."""
    applications = copy.deepcopy(applications)
    for app in applications:
        for deployment in app.get("deployments", []):
            extra = GPU_ACTOR_OPTIONS.get(deployment["name"])
            if extra:
                deployment.setdefault("ray_actor_options", {}).update(extra)
    return applications


def serve_config_v2(applications: list[dict]) -> str:
    """The serveConfigV2 string: a ServeDeploySchema without http_options."""
    body = yaml.safe_dump({"applications": applications}, sort_keys=False, default_flow_style=False)
    return f"{GENERATED_NOTE}\n{body}"


def _indent(text: str, prefix: str) -> str:
    return "".join(prefix + line if line.strip() else line for line in text.splitlines(keepends=True))


def replace_serve_config_block(manifest: str, config: str) -> str:
    """Replace the `serveConfigV2: |` block scalar in a manifest, keeping everything else."""
    match = re.search(r"^(?P<indent>[ ]*)serveConfigV2: \|[^\n]*\n", manifest, flags=re.MULTILINE)
    if not match:
        raise ValueError("no 'serveConfigV2: |' block found")
    key_indent = len(match["indent"])
    end = match.end()
    block_lines = []
    for line in manifest[end:].splitlines(keepends=True):
        if line.strip() and len(line) - len(line.lstrip(" ")) <= key_indent:
            break
        block_lines.append(line)
    # Blank lines after the block separate it from what follows: keep them.
    while block_lines and not block_lines[-1].strip():
        block_lines.pop()
    consumed = sum(len(line) for line in block_lines)
    return manifest[:end] + _indent(config, " " * (key_indent + 2)) + manifest[end + consumed :]


def gpu_patch(applications: list[dict]) -> str:
    header = f"{GENERATED_NOTE}\n# GPU overlay: the base RayService's Serve config with one GPU per Tagger replica.\n"
    patch = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": RAYSERVICE_NAME},
        "spec": {"serveConfigV2": "SERVE_CONFIG_V2"},
    }
    text = yaml.safe_dump(patch, sort_keys=False)
    text = text.replace("serveConfigV2: SERVE_CONFIG_V2\n", "serveConfigV2: |\n")
    return header + text + _indent(serve_config_v2(gpu_applications(applications)), "    ")


def expected_files() -> dict[Path, str]:
    applications = load_applications()
    return {
        RAYSERVICE: replace_serve_config_block(RAYSERVICE.read_text(), serve_config_v2(applications)),
        GPU_PATCH: gpu_patch(applications),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report files that are out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in expected_files().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"updated {path.relative_to(REPO_ROOT)}")
    if args.check and stale:
        for path in stale:
            print(f"out of date: {path.relative_to(REPO_ROOT)} (run: python k8s/sync_serve_config.py)")
        return 1
    if not stale:
        print("serveConfigV2 is in sync with serve/config.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
