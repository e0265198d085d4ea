"""Point-in-time replay and verification of a namespace's journal.

    filters     --from/--to bounds and exclusion rules (sans-I/O)
    request     the job's arguments (one struct for the CLI and the admin API) and its target
    reader      a journal range in stream order, batched, with the retention check
    lastvalue   the last write per item in a range (--last-value-only, verify)
    throttle    --rate
    apply       a batch through a target adapter: per-key runs, retries, waiting out an outage
    progress    the progress / summary structs the CLI and the admin endpoint show
    checkpoint  where an interrupted replay resumes
    job         ReplayJob: apply a range through the drain's target adapters
    verify      VerifyJob: compare a target with the journal's last values, repair
    cli         `walcar replay`, `walcar verify`
"""
