{#-
  Seconds from `start` to `end` (null if either is null) as a double, at millisecond precision.
  dbt.datediff is the cross-database macro (date_diff on DuckDB, DATEDIFF on Snowflake); both
  count unit boundaries, so the difference is taken in milliseconds rather than in seconds,
  where 10:00:00.900 -> 10:00:01.100 would count as a whole second.
-#}
{% macro seconds_between(start, end) -%}
    cast({{ dbt.datediff(start, end, 'millisecond') }} as double) / 1000
{%- endmacro %}
