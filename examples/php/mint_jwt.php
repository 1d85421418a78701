<?php
/**
 * Mint an HS256 JWT for the broker's auth.mode = "jwt" in plain PHP (no Composer).
 *
 *   SSE_JWT_SECRET=... php examples/php/mint_jwt.php USER [TENANT] [CHANNEL_PATTERN...]
 *
 * Prints the token. Environment: SSE_JWT_SECRET (required: the broker's
 * auth.jwt.secret, or one line of auth.jwt.secret_file), SSE_JWT_TTL
 * (seconds, 3600), SSE_JWT_KID (set when the secret's line in secret_file
 * is "<kid> <secret>").
 *
 * In an app: call sse_jwt() when rendering the page that opens the stream and
 * hand the token to the browser (?token=..., or a cookie named auth.cookie).
 */

function base64url(string $bytes): string
{
    return rtrim(strtr(base64_encode($bytes), '+/', '-_'), '=');
}

/**
 * @param array<string, mixed> $claims must include "exp" (the broker requires it)
 */
function sse_jwt(array $claims, string $secret, ?string $kid = null): string
{
    $header = ['alg' => 'HS256', 'typ' => 'JWT'];
    if ($kid !== null) {
        $header['kid'] = $kid;
    }
    $flags = JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_THROW_ON_ERROR;
    $signingInput = base64url(json_encode($header, $flags)) . '.' . base64url(json_encode($claims, $flags));
    $signature = hash_hmac('sha256', $signingInput, $secret, true);
    return $signingInput . '.' . base64url($signature);
}

if (PHP_SAPI === 'cli' && realpath($_SERVER['SCRIPT_FILENAME'] ?? '') === __FILE__) {
    $secret = getenv('SSE_JWT_SECRET');
    if ($secret === false || $secret === '' || !isset($argv[1])) {
        fwrite(STDERR, "usage: SSE_JWT_SECRET=... php mint_jwt.php USER [TENANT] [CHANNEL_PATTERN...]\n");
        exit(2);
    }
    $now = time();
    $claims = [
        'sub' => (string) $argv[1],                    // auth.jwt.user_claim
        'iat' => $now,
        'exp' => $now + (int) (getenv('SSE_JWT_TTL') ?: 3600),  // required
    ];
    if (($argv[2] ?? '') !== '') {
        $claims['tenant'] = (string) $argv[2];         // auth.jwt.tenant_claim
    }
    $channels = array_slice($argv, 3);
    if ($channels) {
        $claims['channels'] = array_values($channels); // auth.jwt.channels_claim: glob patterns
    }
    echo sse_jwt($claims, $secret, getenv('SSE_JWT_KID') ?: null), "\n";
}
