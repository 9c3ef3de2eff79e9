"""The two partitionings: run_id for every asset of a release run (one partition is one run), and
the release version for promotion (one partition is one registry entry)."""

from dagster import DynamicPartitionsDefinition

RUN_IDS = "run_ids"
run_ids = DynamicPartitionsDefinition(name=RUN_IDS)
RELEASE_VERSIONS = "release_versions"
release_versions = DynamicPartitionsDefinition(name=RELEASE_VERSIONS)
