"""The checkpoint procedure's tests: the session, pools, run identity, persistence safety."""
