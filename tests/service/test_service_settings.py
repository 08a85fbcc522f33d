"""One schema for a call's settings: ``SessionSettings``. The service's fields, the partial update
and the defaults all come from it (and from the model's config), so a new setting is one edit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from pipecat.tests.utils import SleepFrame, run_test
from service_fakes import ScriptedBackend, ScriptedCall, SpyBackend, model_frames

from pipecat_michi.engine.call import LocalEngine
from pipecat_michi.engine.engine import DuplexEngine
from pipecat_michi.engine.settings import SessionSettings, SessionSettingsUpdate
from pipecat_michi.model.config import MichiConfig
from pipecat_michi.model.michi import MichiModel
from pipecat_michi.model.tokenizer import load_tokenizer
from pipecat_michi.service import MichiLLMService, MichiSettings
from pipecat_michi.service.settings import SESSION_FIELDS

pytestmark = pytest.mark.timeout(60)

# A valid value other than the default for every SessionSettings field.
SAMPLES = {"temperature": 0.25, "top_k": 7, "flow_steps": 3, "flow_temperature": 0.5, "speak_threshold": 0.61,
           "speak_onset_frames": 3, "seed": 42}


def test_every_session_setting_is_a_service_setting_and_an_update_field() -> None:
    assert SAMPLES.keys() == SessionSettings.model_fields.keys(), "give the new SessionSettings field a sample"
    assert set(SESSION_FIELDS) == SessionSettings.model_fields.keys()
    assert SessionSettingsUpdate.model_fields.keys() == SessionSettings.model_fields.keys()
    assert set(SESSION_FIELDS) <= {f.name for f in dataclasses.fields(MichiSettings)}
    for name, value in SAMPLES.items():
        assert SessionSettings().model_dump()[name] != value
        assert MichiSettings(**{name: value}).session_update() == SessionSettingsUpdate(**{name: value})


async def test_every_session_setting_reaches_the_call_it_opens() -> None:
    backend = ScriptedBackend(ScriptedCall())
    service = MichiLLMService(backend, settings=MichiSettings(**SAMPLES))
    await run_test(service, frames_to_send=[*model_frames(1), SleepFrame(0.1)])
    (opened,) = backend.settings
    assert opened == SessionSettingsUpdate(**SAMPLES)
    assert SessionSettings().updated(opened) == SessionSettings(**SAMPLES)


def test_the_service_leaves_unset_settings_to_the_model_and_validates_in_lax_mode() -> None:
    initial = MichiSettings.initial(None)
    assert all(getattr(initial, name) is None for name in SESSION_FIELDS)
    assert initial.session_update().model_fields_set == set()  # the model's defaults, all of them
    assert MichiSettings(temperature=1, top_k=3).session_update() == SessionSettingsUpdate(temperature=1.0, top_k=3)
    with pytest.raises(ValueError, match="speak_threshold"):
        MichiSettings(speak_threshold=1.5).session_update()
    # A live update: None keeps the call's value, but a None seed draws a new one.
    live = MichiSettings(top_k=None, seed=None)
    assert live.session_update(["top_k", "seed"]).model_dump() == {"seed": None}


async def test_a_checkpoints_calibrated_floor_taking_reaches_serving_unless_the_app_sets_it() -> None:
    torch.manual_seed(0)
    config = MichiConfig.preset("tiny").model_copy(update={"speak_threshold": 0.37, "speak_onset_frames": 3})
    engine = DuplexEngine(model=MichiModel(config).eval(), tokenizer=load_tokenizer(config))
    local = LocalEngine(engine=engine)
    try:
        for settings, expected in [(None, (0.37, 3)), (MichiSettings(speak_threshold=0.6), (0.6, 3)),
                                   (MichiSettings(speak_onset_frames=1), (0.37, 1))]:
            spy = SpyBackend(local)
            service = MichiLLMService(spy, settings=settings)
            await run_test(service, frames_to_send=[SleepFrame(0.1)])
            (call,) = spy.calls
            assert (call.session.settings.speak_threshold, call.session.settings.speak_onset_frames) == expected
    finally:
        await local.close()
