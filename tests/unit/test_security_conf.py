"""The pre-launch decision on a cluster's security settings, from a dict of Spark confs."""

from __future__ import annotations

import pytest

from sparkdl.errors import ConfigError
from sparkdl.launch.checks import ALLOW_UNENCRYPTED_CONF, SECURITY_CONFS, check_security

pytestmark = pytest.mark.timeout(30)


def test_nothing_on_means_no_check():
    assert check_security({}) is None
    assert check_security({key: "false" for key in SECURITY_CONFS}) is None
    assert check_security({"spark.ssl.enabled": None}) is None


@pytest.mark.parametrize("key", sorted(SECURITY_CONFS))
def test_each_setting_refuses_naming_it_the_traffic_and_the_opt_in(key):
    with pytest.raises(ConfigError) as info:
        check_security({key: "true"})
    message = str(info.value)
    assert f"{key}=true" in message
    for channel in ("gloo/NCCL", "rendezvous store", "driver channel", "run directory"):
        assert channel in message
    assert ALLOW_UNENCRYPTED_CONF in message and "allow_unencrypted=True" in message


@pytest.mark.parametrize("key", sorted(SECURITY_CONFS))
def test_the_opt_in_by_keyword_or_conf_gives_the_warning(key):
    by_keyword = check_security({key: "TRUE"}, allow_unencrypted=True)
    by_conf = check_security({key: "true", ALLOW_UNENCRYPTED_CONF: "true"})
    assert by_keyword == by_conf and key in by_keyword and "not protected" in by_keyword


def test_several_settings_are_all_named():
    with pytest.raises(ConfigError) as info:
        check_security({"spark.authenticate": "true", "spark.network.crypto.enabled": "true"})
    assert "spark.authenticate=true" in str(info.value)
    assert "spark.network.crypto.enabled=true" in str(info.value)
