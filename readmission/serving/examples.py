"""The example patient of the predict function's API.

Contract: `EXAMPLE_PATIENT` holds a value for every contract feature (the web form's default,
the OpenAPI document's example, the load test's body); `example_for(model)` is that patient
with any category the model does not accept left missing (None).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from readmission.contract import FEATURES

if TYPE_CHECKING:
    from readmission.serving.model import LoadedModel

# A realistic patient (values seen often in the UCI data): the web form's default, the example
# of the OpenAPI document and the load test's body.
EXAMPLE_PATIENT: dict[str, Any] = {
    "race": "Caucasian",
    "gender": "Female",
    "age": "[70-80)",
    "weight": "?",
    "admission_type_id": "1",
    "discharge_disposition_id": "1",
    "admission_source_id": "7",
    "time_in_hospital": 5,
    "payer_code": "MC",
    "medical_specialty": "InternalMedicine",
    "num_lab_procedures": 45,
    "num_procedures": 1,
    "num_medications": 16,
    "number_outpatient": 0,
    "number_emergency": 0,
    "number_inpatient": 1,
    "diag_1": "428",
    "diag_2": "427",
    "diag_3": "250",
    "number_diagnoses": 9,
    "max_glu_serum": "None",
    "A1Cresult": ">8",
    **{med: "No" for med in FEATURES[FEATURES.index("metformin") : FEATURES.index("change")]},
    "metformin": "Steady",
    "insulin": "Up",
    "change": "Ch",
    "diabetesMed": "Yes",
}
assert set(EXAMPLE_PATIENT) == set(FEATURES)


def example_for(model: LoadedModel) -> dict[str, Any]:
    """The example patient, with any category this model does not know left missing."""
    example = {}
    for spec in model.inputs:
        value = EXAMPLE_PATIENT.get(spec.column)
        example[spec.column] = value if spec.accepted is None or value in spec.accepted else None
    return example
