"""Built-in policies, one subpackage each. One line here registers a policy's ``type`` name."""

BUILTIN: dict[str, str] = {
    "auth": "filters.auth.filter:AuthFilter",
    "openai": "filters.openai.filter:OpenAIFilter",
    "rate_limit": "filters.rate_limit.filter:RateLimitFilter",
    "admission": "filters.admission.filter:AdmissionFilter",
    "breaker": "filters.breaker.filter:BreakerFilter",
    "degrade": "filters.degrade.filter:DegradeFilter",
    "cache": "filters.cache.filter:CacheFilter",
    "jobs": "filters.jobs.filter:JobsFilter",
    "canary": "filters.canary.filter:CanaryFilter",
}
