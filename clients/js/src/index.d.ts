// Types of @lockstep/client (src/index.js).

/** Where a subscription stands in its topic. */
export interface Position {
  offset: number;
  epoch: string;
}

/** What the server said when a subscription (re)started. */
export interface Subscribed extends Position {
  /** false: the missed events could not be replayed (see `onReset`). */
  recovered: boolean;
  /** The position this subscription resumed from; null for a fresh start. */
  resumedFrom: Position | null;
}

/** Missed events could not be replayed: reload the state, live events continue after `offset`. */
export interface Reset extends Position {
  recovered: false;
  reason: 'not_recovered' | 'reset';
}

/** A Lockstep event envelope. */
export interface LockstepEvent<T = unknown> {
  id: string;
  type: string;
  topic: string;
  ts: string;
  data: T;
}

export interface EventMeta extends Position {
  /** A snapshot's state event (the latest of its key), before the live stream. */
  snapshot: boolean;
  /** How many older events of the same key this one replaced in a slow queue. */
  conflated: number;
  headers: Record<string, string>;
}

export interface SubscribeOptions {
  /** Where a fresh subscription starts, or a stored position to resume (a reloaded page). */
  from?: 'next' | 'last' | 'snapshot' | Position;
  onReset?: (reset: Reset) => void;
  onSubscribed?: (subscribed: Subscribed) => void;
  /** The server ended the subscription: `refused` (the SUBSCRIBE was refused: foreign topic,
   * bad id, revoked), or the reason of its `lockstep.unsubscribed` (`revoked`, `token`). */
  onEnd?: (end: { reason: string; message?: string }) => void;
  /** false: no presence events on this subscription. */
  presence?: boolean;
}

export interface Subscription {
  readonly topic: string;
  unsubscribe(): void;
  /** Store this to resume after a page reload (`from`). */
  position(): { offset: number | null; epoch: string | null };
}

export interface LockOptions {
  ttlMs?: number;
  /** Each renewal (`expiresAt` moved on). */
  onRenewed?: (lock: Lock) => void;
  onLost?: (lost: { team: string; item: string; token: number; reason: string }) => void;
}

export interface Lock {
  readonly team: string;
  readonly item: string;
  /** The fencing token: send it with every write. */
  readonly token: number;
  /** When the current grant expires (ms since the epoch); renewed before. */
  readonly expiresAt: number;
  readonly held: boolean;
  renew(): Promise<unknown>;
  release(): Promise<void>;
}

export interface Presence {
  count: number;
  users?: { user: string; connections: number; since: string }[];
  counts_only?: boolean;
}

export type TokenProvider = string | (() => string | Promise<string>);

export interface LockstepOptions {
  url?: string;
  /** Tried in turn on every reconnect (a cluster's nodes). */
  urls?: string[];
  /** The HTTP API's base URL; default: the first WebSocket URL's origin (ws → http, wss → https). */
  http?: string;
  token: TokenProvider;
  /** How long before `exp` a new token is sent over the socket (default 30 s, at most half the lifetime). */
  refreshBeforeMs?: number;
  /** @stomp/stompjs's Client class; default `globalThis.StompJs.Client` (the UMD bundle). */
  Client?: new (config: object) => unknown;
  /** Extra @stomp/stompjs options (reconnectDelay, heartbeats, debug). */
  stomp?: Record<string, unknown>;
  onConnect?: (frame: unknown) => void;
  onDisconnect?: (event: unknown) => void;
  /** A refreshed token was applied by the server (over the open socket). */
  onRefresh?: () => void;
  onError?: (error: Error) => void;
}

export class LockstepError extends Error {
  readonly status: number;
  /** The API's error code, e.g. `lock_held`, `lock_lost`, `forbidden`. */
  readonly code: string;
  readonly body: unknown;
}

/** The claims of a JWT (its payload, not verified); {} when it is not a JWT. */
export function tokenClaims(token: string): Record<string, unknown>;
export function tokenExpiry(token: string): number | null;

export class Lockstep {
  constructor(options: LockstepOptions);
  /** The `session` of the current connection (locks are bound to it). */
  readonly session: string | null;
  /** Token refreshes applied over the socket so far. */
  readonly refreshed: number;
  /** The underlying @stomp/stompjs Client (e.g. `forceDisconnect()` to test a blip). */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  readonly stomp: any;
  connect(): Promise<unknown>;
  subscribe<T = unknown>(
    topic: string,
    handler: (event: LockstepEvent<T>, meta: EventMeta) => void,
    options?: SubscribeOptions,
  ): Subscription;
  publish(topic: string, type: string, data: unknown, headers?: Record<string, string>): void;
  /** Sends a fresh token over the open socket now. */
  refresh(): Promise<void>;
  api<T = unknown>(method: string, path: string, body?: unknown): Promise<T>;
  lock(team: string, item: string, options?: LockOptions): Promise<Lock>;
  presence(topic: string): Promise<Presence>;
  close(): Promise<void>;
}
