import pytest

from nnunet_fixtures import CI_TRAINERS, DATASET_ID, make_raw_dataset, nnunet_env, run


@pytest.fixture(scope="session")
def planned(tmp_path_factory):
    """A tiny dataset planned and preprocessed by the real nnUNetv2_plan_and_preprocess (2d, 3d_fullres)."""
    base = tmp_path_factory.mktemp("nnunet")
    ext = base / "ext_trainers"
    ext.mkdir()
    (ext / "ci_trainers.py").write_text(CI_TRAINERS)
    env = nnunet_env(base, ext)
    raw = make_raw_dataset(base / "raw")
    run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "3d_fullres", "-np", "2",
         "--verify_dataset_integrity"], env)
    return {"base": base, "env": env, "raw": raw, "ext": ext}
