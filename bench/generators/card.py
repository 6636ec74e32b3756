"""The generator card: what a synthetic set was made from, in a form the privacy audit can check.

A card is YAML (or JSON). Reference generators write it; users bring their own for `import-synthetic`. Patient ids
appear only as SHA-256 hex digests of the id string (`hash_id`), so a card can be published; the audit hashes the
task's test and external patients the same way to find overlap.

```yaml
schema_version: 1
name: pca-gmm               # generator name (required)
version: "1.0"              # generator version (required)
seed: 0
task: {name: tiny, version: "1.0"}
samples_per_class: {blank: 20, disc: 20, bar: 20}
n_samples: 60
image: {size: 32, channels: 1, format: png}
masks: {pairs: true, classes: [...], ...}  # segmentation sets only (image–mask pairs)
only: {sex: M}              # subgroup the generator was restricted to, or null
training:                   # required
  manifest_sha256: <64 hex> # bench.manifest.manifest_hash of the training manifest
  manifest: train_manifest.parquet
  sites: [s1, s2, s3]       # required, at least one
  patients: [<64 hex>, ...] # SHA-256 of each training patient id
  n_images: 43
  n_patients: 22
config: {preset: tiny, ...}
```
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from bench.errors import BadInput
from bench.io import write_text
from bench.schema import StrictMutable, read_mapping_file, validate_model

CARD_FILE = "card.yaml"
SCHEMA_VERSION = 1
HEX64 = r"^[0-9a-f]{64}$"


def hash_id(value: Any) -> str:
    """SHA-256 hex of an identifier's string form: the only form in which patient ids leave the machine."""
    return hashlib.sha256(str(value).encode("utf-8")).hexdigest()


class TaskRef(StrictMutable):
    name: str
    version: str


class ImageInfo(StrictMutable):
    size: int | None = None
    height: int | None = None
    width: int | None = None
    channels: int | None = None
    format: str | None = None


class MaskInfo(StrictMutable):
    """A segmentation set's masks: image–mask pairs, label maps in the task's mask-class order."""

    pairs: bool = True
    classes: list[str] = Field(min_length=1)
    format: str | None = None
    column: str = "mask_path"
    method: str | None = None
    requested_per_class: dict[str, int] | None = None
    n_empty: int | None = Field(None, ge=0)


class Training(StrictMutable):
    manifest_sha256: str | None = Field(None, pattern=HEX64)
    manifest: str | None = None
    sites: list[str] = Field(min_length=1)
    patients: list[str] = Field(default_factory=list)
    n_images: int | None = Field(None, ge=0)
    n_patients: int | None = Field(None, ge=0)
    splits: list[str] = Field(default_factory=lambda: ["train"])


class GeneratorCard(StrictMutable):
    schema_version: int = SCHEMA_VERSION
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    description: str = ""
    link: str | None = None
    license: str | None = None
    citation: str | None = None
    created: str | None = None
    seed: int | None = None
    task: TaskRef | None = None
    samples_per_class: dict[str, int] = Field(default_factory=dict)
    n_samples: int | None = None
    image: ImageInfo | None = None
    masks: MaskInfo | None = Field(None, description="segmentation sets only: the masks beside the images")
    only: dict[str, str] | None = None
    training: Training
    config: dict[str, Any] = Field(default_factory=dict)
    control: dict[str, Any] | None = Field(
        None, description="for a control generator: its role, purpose and expected outcomes (checks)"
    )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def card_path_for(manifest: str | Path) -> list[Path]:
    """Where a synthetic manifest's card is looked for, in order: `<stem>.card.yaml`, then `card.yaml`, beside it."""
    m = Path(manifest)
    return [m.with_name(m.stem + ".card.yaml"), m.with_name(CARD_FILE)]


def find_card(manifest: str | Path, card: str | Path | None = None) -> Path:
    if card is not None:
        p = Path(card)
        if not p.is_file():
            raise BadInput(f"--card {p}: file not found")
        return p
    for p in card_path_for(manifest):
        if p.is_file():
            return p
    looked = ", ".join(str(p) for p in card_path_for(manifest))
    raise BadInput(
        f"{manifest}: synthetic manifest without a generator card (looked for {looked}); pass --card CARD.yaml"
    )


def read_card(path: str | Path) -> GeneratorCard:
    """Parse and validate a card; exit-2 errors name the file and the field."""
    path = Path(path)
    raw = read_mapping_file(path, "generator card")
    if "version" in raw and not isinstance(raw["version"], str):
        raw["version"] = str(raw["version"])
    card = validate_model(GeneratorCard, raw, path, "generator card")
    bad = [i for i, p in enumerate(card.training.patients) if not _is_hex64(p)]
    if bad:
        raise BadInput(
            f"{path}: field 'training.patients': entries {bad[:10]} are not SHA-256 hex digests; cards carry "
            "hashed patient ids only (bench.generators.card.hash_id)"
        )
    return card


def _is_hex64(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def write_card(path: str | Path, card: GeneratorCard) -> Path:
    text = yaml.safe_dump(card.to_dict(), sort_keys=False, allow_unicode=True)
    return write_text(path, text)
