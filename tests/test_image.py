"""cluster/Dockerfile, the cluster manifests and pyproject.toml agree: one set of versions, one image name."""

from __future__ import annotations

import re
import tomllib

import yaml
from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DOCKERFILE = (REPO / "cluster" / "Dockerfile").read_text()
VERSION = PYPROJECT["project"]["version"]


def pins(requirements: list[str]) -> dict[str, str]:
    found = {}
    for requirement in requirements:
        match = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([0-9][^\s;,'\"]*)", requirement.strip())
        if match:
            found[match.group(1).lower()] = match.group(3)
    return found


def manifest_documents():
    for path in sorted((REPO / "cluster").glob("*.yaml")):
        yield from (doc for doc in yaml.safe_load_all(path.read_text()) if doc)


def walk(node, key: str):
    """Every value under `key`, anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        for name, value in node.items():
            if name == key:
                yield value
            yield from walk(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def test_the_dockerfile_pins_nothing_pyproject_pins_differently():
    declared = pins(PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["gpu"])
    in_image = pins(re.findall(r"[A-Za-z0-9_.-]+(?:\[[^\]]*\])?==[0-9][^\s'\"]*", DOCKERFILE))
    shared = set(declared) & set(in_image)
    assert {name: in_image[name] for name in shared} == {name: declared[name] for name in shared}
    # torch is the pin that matters most (a loose one pulls a CUDA build): the image reads it from pyproject.
    assert "torch==" not in DOCKERFILE.replace("torch==[0-9.]*", "")
    assert "pip install . " in DOCKERFILE or "pip install .;" in DOCKERFILE.replace(" ;", ";")
    assert "pip install '.[gpu]'" in DOCKERFILE


def test_the_image_installs_the_embedded_packages_the_makefile_installs():
    makefile = (REPO / "Makefile").read_text()
    line = re.search(r"--no-deps ([^\n]+)", makefile).group(1).split()
    image = re.search(r"--no-deps ([^\\\n&]+)", DOCKERFILE).group(1).split()
    assert pins(line) == pins(image) and len(pins(line)) == 3


def test_the_image_copies_every_package_pyproject_ships():
    packages = [pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
    for package in packages:
        assert f"COPY {package} {package}" in DOCKERFILE, package


def test_every_manifest_names_this_version_of_the_image_and_of_ray():
    ray_pin = pins(PYPROJECT["project"]["dependencies"])["ray"]
    images = [image for doc in manifest_documents() for image in walk(doc, "image")]
    assert images, "the manifests name no image"
    for image in images:
        assert image in (f"ghcr.io/finescope/finescope:{VERSION}", f"ghcr.io/finescope/finescope-gpu:{VERSION}"), image
        assert f"-t {image} " in DOCKERFILE or f"-t {image}\n" in DOCKERFILE, f"the Dockerfile does not build {image}"
    versions = [str(version) for doc in manifest_documents() for version in walk(doc, "rayVersion")]
    assert versions and set(versions) == {ray_pin}
