"""The run directory: where each file of a run lies (`layout`: `RunDir`, `StudyDir`) and reading a
finished run back (`artifacts`: its config, data plan and released models), the one public
loading API that audits and reports use."""
