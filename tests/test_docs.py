"""README.md and docs/ cannot drift from the code: every command, flag, config key, path and link they show
exists (tests/docs_check.py), and docs/config.md is what pipeline/config.py's field table renders.

Each planted-mistake test runs the same checker on a small text, so a checker that stopped finding
anything would fail here rather than pass everything silently.
"""
from pathlib import Path

import pytest

from pipeline import config_reference
from tests import docs_check
from tests.docs_check import REPO


def test_readme_and_docs_show_only_what_exists():
    texts = {path: path.read_text() for path in docs_check.doc_files()}
    problems = docs_check.check_texts(texts)
    assert not problems, "\n".join(problems)


def test_docs_cover_the_pages_a_user_needs():
    pages = {"install.md", "data.md", "model.md", "training.md", "cluster.md", "planner.md", "config.md",
             "benchmarks.md", "tutorials/imagenet21k-to-imagenet1k.md", "tutorials/jft-multilabel-to-imagenet1k.md",
             "tutorials/s3.md"}
    assert pages <= {str(p.relative_to(REPO / "docs")) for p in (REPO / "docs").rglob("*.md")}
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 220, "README.md is a router: move detail into docs/"
    assert all(f"docs/{page}" in readme for page in pages), "the README's index links every docs page"


def test_config_reference_is_generated_from_the_code():
    assert (REPO / "docs" / "config.md").read_text() == config_reference.render(), (
        "run `python -m pipeline.config_reference --write`")
    assert "| `train.sigterm_grace_s` | `25.0` |" in config_reference.render()


@pytest.fixture()
def planted(tmp_path: Path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Real heading\n")

    def check(body: str) -> list[str]:
        doc = tmp_path / "page.md"
        doc.write_text(body)
        return docs_check.check_texts({doc: body})
    return check


def test_a_correct_planted_page_passes(planted):
    assert planted("```bash\npytest -q tests -m \"not slow\"\n```\n") == []  # pytest's -m is no module
    assert planted("```bash\npython -m launch.plan --config configs/pretrain/jft_coatnet-7.yaml --nodes 8 "
                   "--gpus-per-node 8 --gpu-mem-gb 80 train.epochs=3 pretrained=null\n```\n"
                   "See [other](other.md#real-heading) and `optim.lr=3e-4`.\n") == []


@pytest.mark.parametrize("body, expected", [
    ("```bash\npython -m launch.plan --config x.yaml --nodez 8\n```\n", "--nodez is not an option of `launch.plan`"),
    ("```bash\npython -m data_prep shard SRC OUT --max-sise 512\n```\n", "--max-sise is not an option of "
                                                                        "`data_prep shard`"),
    ("```bash\nsbatch launch/slurm/pretrain.sbatch --confg x.yaml\n```\n", "--confg is not an option of "
                                                                          "`launch/slurm/pretrain.sbatch`"),
    ("```bash\nsbatch launch/slurm/shard.sbatch -- SRC OUT --max-sise 9\n```\n", "--max-sise is not an option of "
                                                                                 "`data_prep shard`"),
    ("```bash\nsbatch --wrap \"srun torchrun -m pipeline.evaluate --weigths W\"\n```\n",
     "--weigths is not an option of `pipeline.evaluate`"),
    ("run `python -m pipeline.pretrain --config c.yaml optim.lrr=1`\n", "optim.lrr= is not a config key"),
    ("`train.stepz=5` in prose\n", "train.stepz= is not a config key"),
    ("```bash\npython -m pipeline.finetune --config c.yaml pretrianed=runs/x\n```\n", "pretrianed= is not a config"),
    ("```bash\npython -m pipeline.trian --help\n```\n", "`pipeline.trian` does not exist"),
    ("```bash\n.venv/bin/python benchmarks/plan_scale.py --sizez 1M\n```\n", "--sizez is not an option of "
                                                                              "`benchmarks/plan_scale.py`"),
    ("```bash\npython -m data_prep shrad SRC OUT\n```\n", "`data_prep shrad` does not exist"),
    ("see [the page](missing.md)\n", "link missing.md does not resolve"),
    ("see [the page](other.md#no-such-heading)\n", "no heading #no-such-heading in other.md"),
    ("```bash\npython benchmarks/no_such_bench.py\n```\n", "benchmarks/no_such_bench.py does not exist"),
], ids=["flag", "subcommand-flag", "script-flag", "after-dashdash", "wrapped", "key", "inline-key", "top-key",
        "module", "benchmark-flag", "subcommand",
        "link", "anchor", "path"])
def test_a_planted_mistake_is_found(planted, body, expected):
    problems = planted(body)
    assert any(expected in p for p in problems), problems
