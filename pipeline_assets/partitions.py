"""Every pipeline asset is partitioned by run_id: one partition is one release run."""

from dagster import DynamicPartitionsDefinition

RUN_IDS = "run_ids"
run_ids = DynamicPartitionsDefinition(name=RUN_IDS)
