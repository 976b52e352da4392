"""VirusEye: the live outbreak web view served from the GOC.

- ``queries``: the aggregations over the hub database (one ``snapshot`` per refresh);
- ``status``: the ``tower_status`` table towers' monitors write, its DDL (``schema.sql``);
- ``auth``: operators' scrypt hashes, signed session cookies, login limits (counted before
  the password is checked, per address and per account);
- ``revocations``: logged-out sessions kept in the hub (``eye_revoked_sessions``) across restarts;
- ``app``: the aiohttp server (login, page, JSON, server-sent events); ``static/``: the page;
- ``__main__``: ``mailtower-eye serve | schema | operator``.
"""
