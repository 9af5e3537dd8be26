"""clean-fid's Inception network: offline, one line naming where the weights go."""

from __future__ import annotations

import pytest

from diffusion_core.inception import inception_extractor, inception_weights_path


@pytest.mark.skipif(inception_weights_path().is_file(), reason="Inception weights are present")
def test_inception_extractor_offline_error_names_the_file() -> None:
    with pytest.raises(RuntimeError, match="inception-2015-12-05.pt") as info:
        inception_extractor("cpu")
    assert str(inception_weights_path()) in str(info.value) and "\n" not in str(info.value)
