"""The input data contract: schemas, validation rules and quarantine (``validation``); the README's "Data
contract" section is the contract itself. Dagster-free."""
