"""Session fixtures shared by the export tests: each tiny run is trained once per test session."""

import pytest

from tests.export import test_classification, test_segmentation


@pytest.fixture(scope="session")
def classifier_run(tmp_path_factory):
    """A trained tiny classifier run folder (test_classification's)."""
    return test_classification.make_run_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def segmenter_run(tmp_path_factory):
    """A trained tiny DeepLabV3+ segmentation run folder (test_segmentation's)."""
    return test_segmentation.make_run_dir(tmp_path_factory)
