"""The customers' quarantine portal at the GOC (docs/quarantine.md, "The portal").

- ``store``: its tables (``schema.sql``: portal_users, portal_sessions, portal_links,
  portal_audit), the role ``mt_portal``'s grants, and every query of the quarantine, scoped by
  the session's role in one place (``_scoped``);
- ``render``: the pages, built on the server, every value escaped, no script;
- ``mail``: the one-time sign-in links mailed to users;
- ``app``: the aiohttp server (sign-in, list, message, release / delete / allow-list, expiry
  of the GOC's copy);
- ``cli``: ``mailtower portal user add|passwd|remove|list`` and ``schema``;
- ``__main__``: ``mailtower-portal serve``.
"""
