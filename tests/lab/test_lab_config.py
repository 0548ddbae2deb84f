"""The lab's research config: the product's CrowdFlower config plus the research variants, merges and soups."""

from __future__ import annotations

from pathlib import Path

import yaml

from annomine.config import load_job_config
from annomine.stages import BY_NAME

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "lab" / "conf" / "crowdflower.yaml"
PRODUCT = ROOT / "conf" / "crowdflower.yaml"


def test_the_lab_config_loads_every_section_and_its_research_variants():
    import importlib

    from lab.train_merges import SECTION, LabConfig

    doc = yaml.safe_load(LAB.read_text())
    for section in doc:
        if section in ("project", SECTION):
            continue
        load_job_config(LAB, section, importlib.import_module(BY_NAME[section].module).CONFIG_CLASS)
    from jobs.curriculum import CurriculumConfig

    _, cfg = load_job_config(LAB, "curriculum", CurriculumConfig)
    assert list(cfg.variants) == ["curriculum", "human", "mixed", "no_llm", "curriculum_roar", "human_plus_curriculum",
                                  "curriculum_then_human", "curriculum_with_human"]
    assert {st.source for st in cfg.variant_stages("no_llm")} == {"set_logic"}
    assert [st.name for st in cfg.variant_stages("curriculum_with_human")] == ["easy", "hard_with_human", "token_similar"]
    _, lab = load_job_config(LAB, SECTION, LabConfig)
    assert set(lab.merges) == {"curriculum_merged_human"}
    assert set(lab.soups) == {"curriculum_soup", "curriculum_soup_uniform"}


def test_the_lab_config_is_the_product_s_plus_the_research_keys():
    """Figures from the lab compare with the product's: the same project, judge, mining and training settings."""
    from lab.train_merges import SECTION

    lab, product = yaml.safe_load(LAB.read_text()), yaml.safe_load(PRODUCT.read_text())
    assert set(lab) - set(product) == {SECTION} and not set(product) - set(lab)
    for section in product:
        if section not in ("curriculum", "train", "rank", "evaluate"):
            assert lab[section] == product[section], section
    assert lab["rank"] == {**product["rank"], "ablations": True, "start_from": ["zero", "ce"]}, \
        "the lab also fits the rank stage's ablations and a ranker started from the cross-encoder's order"
    assert {**lab["evaluate"], "models": product["evaluate"]["models"]} == product["evaluate"]
    assert lab["evaluate"]["models"] == product["evaluate"]["models"] + ["ranked-raw", "ranked-no-ce"]
    assert {**lab["train"], "baselines": product["train"]["baselines"]} == product["train"]
    assert lab["train"]["baselines"] == [], "the lab trains one variant per command"
    lab_cur, product_cur = dict(lab["curriculum"]), dict(product["curriculum"])
    assert {k: v for k, v in lab_cur.items() if k not in ("variants", "stages")} == \
        {k: v for k, v in product_cur.items() if k not in ("variants", "stages")}
    assert lab_cur["variants"].items() >= product_cur["variants"].items()
    assert lab_cur["stages"][:len(product_cur["stages"])] == product_cur["stages"]
