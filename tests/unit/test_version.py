"""The version is written once (sidecar/__init__.py); everything that repeats it must agree."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

import sidecar
from sidecar.inject.settings import InjectorSettings

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_takes_the_version_from_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sidecar.__version__"}


def test_helm_chart_ships_the_package_version() -> None:
    chart = yaml.safe_load((ROOT / "helm" / "walcar" / "Chart.yaml").read_text())
    assert chart["appVersion"] == sidecar.__version__  # the image tag the chart deploys by default
    assert str(chart["version"]) == sidecar.__version__


def test_injector_injects_the_image_of_its_own_version() -> None:
    assert InjectorSettings().image == f"ghcr.io/walcar/walcar:{sidecar.__version__}"
